"""Reading an image and its extra modalities into one (H, W, C) uint8 array.

The visible image gives 3 channels (the paper's input, R = G = B on Severstal data); every extra
modality (``train_images_<m>/``, same file name) gives one more grey channel, in the configured
order: early fusion. A data set whose visible images are grey stored as RGB (Severstal's: found
when the data set is checked, ``catalog``) is read with one visible channel: a JPEG then decodes
its luma alone, which is every channel of such an image, and the batch carries a third of the
bytes; ``steelseg.model.inputs.to_inputs`` makes the three channels again on the device.
"""

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from steelseg.errors import SteelsegError
from steelseg.storage import is_uri, locate, shown


def in_channels(modalities: Sequence[str]) -> int:
    """Model input channels for a modality list whose first entry is the visible image."""
    return 3 + len(modalities) - 1


def parse_size(text: str) -> tuple[int, int]:
    """``HEIGHTxWIDTH`` (256x1600) -> (256, 1600).

    Raises:
        ValueError: not two whole numbers >= 1 joined by an x.
    """
    height, sep, width = text.strip().lower().partition("x")
    if not (sep and height.isdigit() and width.isdigit() and int(height) and int(width)):
        raise ValueError(f"must be HEIGHTxWIDTH in pixels, e.g. 256x1600, got {text!r}")
    return int(height), int(width)


def path_columns(modalities: Sequence[str]) -> list[str]:
    """The catalog columns of an image's files: ``path`` (visible), then ``path_<m>``."""
    return ["path"] + [f"path_{m}" for m in modalities[1:]]


def open_image(path: str, head: int | None = None) -> Image.Image:
    """A local image, or one in a bucket (``s3://...``: the bytes are read into memory; with
    ``head`` only the first ``head`` bytes, enough for the size).

    Raises:
        OSError: as ``PIL.Image.open``; SteelsegError naming the URI for a missing object or a
            store error.
    """
    if not is_uri(path):
        return Image.open(path)
    return Image.open(io.BytesIO(locate(path, "image").read_bytes(head)))


def read_image(path: str, mode: str = "RGB") -> np.ndarray:
    """(H, W, 3) for mode RGB, (H, W) for mode L, from a local path or a bucket URI. In mode L a
    JPEG decodes its luma (Y) only: no chroma, no colour conversion.

    Raises:
        SteelsegError: a missing or unreadable file, named.
    """
    try:
        data = locate(path, "image").read_bytes() if is_uri(path) else Path(path).read_bytes()
    except FileNotFoundError:
        raise SteelsegError(f"{path}: no such image") from None
    except OSError as e:
        raise SteelsegError(f"{shown(path)}: unreadable image ({e})") from None
    return decode_image(data, shown(path), mode)


def decode_image(data: bytes, name: str, mode: str = "RGB") -> np.ndarray:
    """An image file's bytes -> (H, W, 3) for mode RGB, (H, W) for mode L: the one decode of
    prediction, training and the HTTP service. ``name`` is how messages call the image.

    Raises:
        SteelsegError: bytes that are no image PIL reads, or one cut short.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if mode == "L":
                im.draft("L", im.size)  # a JPEG's decoder outputs Y; other formats ignore it
            return np.asarray(im.convert(mode))
    except UnidentifiedImageError:  # its message names the BytesIO object
        raise SteelsegError(f"{name}: unreadable image (cannot identify image file)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SteelsegError(f"{name}: unreadable image ({e})") from None


def is_grey(image: np.ndarray) -> bool:
    """Whether an (H, W, 3) image has three equal channels (an (H, W) one is grey)."""
    if image.ndim == 2:
        return True
    first = image[:, :, :1]
    return bool((image == first).all())


def read_stack(paths: Sequence[str], grey: bool = False) -> np.ndarray:
    """The visible image at ``paths[0]`` (3 channels; with ``grey``, 1: its luma) and one grey
    channel per further path.

    Raises:
        SteelsegError: a missing or unreadable file, or modalities of different sizes.
    """
    visible = read_image(paths[0], "L")[:, :, None] if grey else read_image(paths[0], "RGB")
    return stack_modalities(visible, [(p, read_image(p, "L")) for p in paths[1:]])


def stack_modalities(visible: np.ndarray, extras: Sequence[tuple[str, np.ndarray]]) -> np.ndarray:
    """The visible (H, W, 3) image (or (H, W, 1), grey) and the (H, W) grey image of each further
    modality, named for messages, as one (H, W, C + extras) array.

    Raises:
        SteelsegError: a modality of another size than the visible image.
    """
    if not extras:
        return visible
    for name, channel in extras:
        if channel.shape[:2] != visible.shape[:2]:
            raise SteelsegError(
                f"{name}: size {channel.shape[0]}x{channel.shape[1]} differs from the visible "
                f"image's {visible.shape[0]}x{visible.shape[1]}"
            )
    return np.concatenate([visible] + [channel[:, :, None] for _, channel in extras], axis=2)
