"""The HTTP service's requests and answers, without Ray: a request's body -> checked images, and
a predicted image -> its JSON (``steelseg.inference.serve`` runs these on its replicas).

``POST /predict`` takes one JPEG (``Content-Type: image/jpeg``) or a batch as
``multipart/form-data``: a part named ``image`` per image, its file name naming the image, and
for a fusion model a part ``image_<modality>`` of the same file name for each further modality
(as predict reads ``test_images_<modality>/<name>``). Each image is decoded by
``images.decode_image``, prediction's own decode; an answer's RLE strings are
``predict.encode_bits``'s, the submission's.

What the service refuses is a ``Refused``: an HTTP status and a one-line reason.
"""

import dataclasses
import io
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from steelseg.data import images
from steelseg.domain import CLASS_IDS
from steelseg.errors import SteelsegError
from steelseg.inference.predict import encode_bits

JPEG_START = b"\xff\xd8\xff"
MAX_SIDE = 4096  # the largest height or width the service takes when any size is allowed
MAX_PARTS = 256  # parts of a multipart body
SINGLE_NAME = "image"  # the name a bare JPEG body gets in the answer


class Refused(Exception):
    """A request the service does not answer with predictions: its HTTP status and why."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclasses.dataclass(frozen=True)
class Accepted:
    """The images a service takes: its model's modalities, and one size (height, width) or,
    with None, any size up to ``MAX_SIDE`` a side (padded to multiples of 32 as predict pads)."""

    modalities: tuple[str, ...] = ("visible",)
    size: tuple[int, int] | None = (256, 1600)

    def describe(self) -> str:
        if self.size is None:
            return f"any height and width up to {MAX_SIDE} pixels"
        return f"{self.size[0]}x{self.size[1]} pixels (height x width) only"

    def check_size(self, name: str, height: int, width: int) -> None:
        fits = (height, width) == self.size if self.size else max(height, width) <= MAX_SIDE
        if not fits:
            reason = f"{name}: {height}x{width} pixels; the service takes {self.describe()}"
            raise Refused(422, reason)


def media_type(content_type: str) -> str:
    """``image/jpeg; charset=...`` -> ``image/jpeg``."""
    return content_type.split(";", 1)[0].strip().lower()


def check_length(content_length: str | None, limit: int) -> None:
    """Refuse a body that its Content-Length says is over ``limit`` bytes, before reading it."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise Refused(413, f"request body of {content_length} bytes; the limit is {limit}")


async def read_body(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """A request's body, read until it passes ``limit`` bytes (a body sent without a
    Content-Length, or one that lies about it)."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise Refused(413, f"request body over {limit} bytes, the limit")
    return bytes(body)


async def multipart_parts(headers: Mapping[str, str], body: bytes) -> list[tuple[str, str, bytes]]:
    """A multipart/form-data body -> its file parts as (field name, file name, bytes); a part
    that is not a file is refused."""
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once() -> AsyncGenerator[bytes, None]:
        yield body

    fields = Headers(headers=dict(headers))
    parser = MultiPartParser(fields, once(), max_files=MAX_PARTS, max_fields=MAX_PARTS)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise Refused(400, f"bad multipart/form-data body ({e.message})") from None
    try:
        parts = []
        for field, value in form.multi_items():
            if isinstance(value, str):
                raise Refused(400, f"part {field!r} is not a file: send each image as a file part")
            parts.append((field, value.filename or "", await value.read()))
        return parts
    finally:
        await form.close()


def single_image(body: bytes, accepted: Accepted) -> list[tuple[str, np.ndarray]]:
    """A bare JPEG body -> [(its name, the image)]."""
    if len(accepted.modalities) > 1:
        raise Refused(
            400,
            f"this model fuses {', '.join(accepted.modalities)}: send multipart/form-data with "
            f"parts {', '.join(part_names(accepted.modalities))} for each image",
        )
    return [(SINGLE_NAME, decode(body, SINGLE_NAME, "RGB", accepted))]


def batch_images(
    parts: Sequence[tuple[str, str, bytes]], accepted: Accepted
) -> list[tuple[str, np.ndarray]]:
    """Multipart parts (field name, file name, bytes) -> [(file name, the image)], in the
    order of their ``image`` parts, each stacked with its further modalities."""
    wanted = part_names(accepted.modalities)
    by_field: dict[str, dict[str, bytes]] = {field: {} for field in wanted}
    for field, filename, data in parts:
        if field not in by_field:
            raise Refused(400, f"part {field!r}: this model takes parts {', '.join(wanted)}")
        if not filename:
            raise Refused(400, f"a part {field!r} without a file name (it names the image)")
        if filename in by_field[field]:
            raise Refused(400, f"two parts {field!r} named {filename!r}")
        by_field[field][filename] = data
    if not by_field["image"]:
        raise Refused(400, "no part named 'image' in the multipart body")
    out = []
    for name, data in by_field["image"].items():
        visible = decode(data, name, "RGB", accepted)
        extras = []
        for modality, field in zip(accepted.modalities[1:], wanted[1:]):
            if name not in by_field[field]:
                raise Refused(400, f"{name}: no {field} part (this model fuses {modality})")
            extras.append((f"{name} ({field})", decode(by_field[field][name], name, "L", accepted)))
        try:
            out.append((name, images.stack_modalities(visible, extras)))
        except SteelsegError as e:
            raise Refused(422, str(e)) from None
    return out


def part_names(modalities: Sequence[str]) -> list[str]:
    return ["image"] + [f"image_{m}" for m in modalities[1:]]


def decode(data: bytes, name: str, mode: str, accepted: Accepted) -> np.ndarray:
    """A JPEG's bytes -> its pixels, its size checked from the header before it is decoded."""
    if not data.startswith(JPEG_START):
        raise Refused(400, f"{name}: not a JPEG image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except UnidentifiedImageError:  # its message names the BytesIO object
        raise Refused(400, f"{name}: unreadable image (cannot identify image file)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise Refused(400, f"{name}: unreadable image ({e})") from None
    accepted.check_size(name, height, width)
    try:
        return images.decode_image(data, name, mode)
    except SteelsegError as e:
        raise Refused(400, str(e)) from None


def classes_json(bits: np.ndarray, scores: np.ndarray) -> list[dict]:
    """One image's class bits and (4,) scores -> per class its RLE (Kaggle's format, '' for
    none), pixel count and presence score (its highest probability on the image, what a
    rule's gate compares)."""
    rles = encode_bits(bits)
    return [
        {
            "class_id": class_id,
            "rle": rles[c],
            "pixels": int(np.count_nonzero((bits >> c) & 1)),
            "presence": round(float(scores[c]), 6),
        }
        for c, class_id in enumerate(CLASS_IDS)
    ]


def image_json(name: str, image: np.ndarray, classes: list[dict]) -> dict:
    """One image's answer: its name and size, and ``classes_json``'s classes."""
    return {"name": name, "height": image.shape[0], "width": image.shape[1], "classes": classes}
