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

import numpy as np
from PIL import Image

from steelseg.errors import SteelsegError
from steelseg.storage import is_uri, locate, shown


def in_channels(modalities: Sequence[str]) -> int:
    """Model input channels for a modality list whose first entry is the visible image."""
    return 3 + len(modalities) - 1


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
        with open_image(path) as im:
            if mode == "L":
                im.draft("L", im.size)  # a JPEG's decoder outputs Y; other formats ignore it
            return np.asarray(im.convert(mode))
    except FileNotFoundError:
        raise SteelsegError(f"{path}: no such image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SteelsegError(f"{shown(path)}: unreadable image ({e})") from None


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
    if len(paths) == 1:
        return visible
    channels = [visible] + [read_image(p, "L")[:, :, None] for p in paths[1:]]
    for path, channel in zip(paths[1:], channels[1:]):
        if channel.shape[:2] != visible.shape[:2]:
            raise SteelsegError(
                f"{path}: size {channel.shape[0]}x{channel.shape[1]} differs from the visible "
                f"image's {visible.shape[0]}x{visible.shape[1]}"
            )
    return np.concatenate(channels, axis=2)
