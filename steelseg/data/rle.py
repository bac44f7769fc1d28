"""Kaggle run-length encoding of Severstal masks.

Pixels are numbered top to bottom, then left to right (column-major), starting at 1, and a
string is space-separated ``start length`` pairs, sorted and not overlapping.

Masks decoded here keep that column-major storage: ``decode`` returns an (H, W) array that is a
transposed view of a (W, H) buffer. Turning it into row-major order costs ten times more than
the decoding itself (a transposing copy), so it is left to whoever needs it.
"""

from collections.abc import Sequence

import numpy as np

from steelseg.errors import RLEError


def _where(image_id: str, class_id: int | None) -> str:
    place = f"image {image_id or '?'}"
    return place if class_id is None else f"{place} class {class_id}"


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def run_lengths(
    rle: str, height: int, width: int, *, image_id: str = "", class_id: int | None = None
) -> np.ndarray:
    """Parse an EncodedPixels string into alternating gap and run lengths over all pixels.

    The result is ``[gap, run, gap, run, ..., gap]`` in column-major pixel order and sums to
    ``height * width``; its odd entries are the runs. A valid string has every gap >= 0 and every
    run >= 1, so that one test checks order, overlap and bounds at once.

    Raises:
        RLEError: odd token count, non-numeric token, start below 1, length below 1, a run past
            ``height * width``, or runs out of order or overlapping. The message names the image
            and class.
    """
    try:
        tokens = np.fromstring(rle, dtype=np.int64, sep=" ")
    except ValueError:
        where = _where(image_id, class_id)
        raise RLEError(f"bad RLE for {where}: non-numeric token in {_clip(rle)!r}") from None
    if tokens.size % 2:
        where = _where(image_id, class_id)
        raise RLEError(f"bad RLE for {where}: odd number of tokens ({tokens.size})")
    bounds = np.empty(tokens.size + 2, dtype=np.int64)
    bounds[0], bounds[-1] = 0, height * width
    bounds[1:-1] = tokens
    bounds[1:-1:2] -= 1
    bounds[2:-1:2] += bounds[1:-1:2]
    lengths = np.diff(bounds)
    if tokens.size and (lengths[0::2].min() < 0 or lengths[1::2].min() < 1):
        _explain(tokens, height * width, _where(image_id, class_id))
    return lengths


def _explain(tokens: np.ndarray, n_pixels: int, where: str) -> None:
    """Raise the error that says which run of an invalid string is wrong, and how."""
    starts, lengths = tokens[0::2], tokens[1::2]
    if (bad := np.flatnonzero(lengths < 1)).size:
        raise RLEError(f"bad RLE for {where}: run {bad[0] + 1} has length {lengths[bad[0]]}")
    if starts[0] < 1:
        raise RLEError(f"bad RLE for {where}: run 1 starts at pixel {starts[0]}")
    ends = starts - 1 + lengths
    if (bad := np.flatnonzero(starts[1:] - 1 < ends[:-1])).size:
        i = bad[0] + 1
        raise RLEError(
            f"bad RLE for {where}: run {i + 1} (start {starts[i]}) is out of order "
            f"or overlaps run {i} (pixels {starts[i - 1]}..{ends[i - 1]})"
        )
    raise RLEError(
        f"bad RLE for {where}: run {ends.size} ends at pixel {ends[-1]}, past {n_pixels} pixels"
    )


_alternating = np.zeros(0, dtype=np.uint8)


def _values(n: int) -> np.ndarray:
    """0, 1, 0, 1, ... of length n (a slice of one cached array)."""
    global _alternating
    if _alternating.size < n:
        _alternating = np.arange(2 * n + 1, dtype=np.uint8) % 2
    return _alternating[:n]


def decode(
    rle: str, height: int, width: int, *, image_id: str = "", class_id: int | None = None
) -> np.ndarray:
    """Decode one EncodedPixels string.

    Args:
        rle: the string; empty means an empty mask.
        height, width: the image size.
        image_id, class_id: named in the error message of a bad string.

    Returns:
        uint8 array of shape (height, width), 1 inside the mask, Fortran-ordered.
    """
    lengths = run_lengths(rle, height, width, image_id=image_id, class_id=class_id)
    return np.repeat(_values(lengths.size), lengths).reshape(width, height).T


def empty_masks(n: int, height: int, width: int) -> np.ndarray:
    """An uninitialised (n, height, width) uint8 array in the layout ``decode_classes`` writes."""
    return np.empty((n, width, height), dtype=np.uint8).transpose(0, 2, 1)


def decode_classes(
    rles: Sequence[str],
    height: int,
    width: int,
    *,
    image_id: str = "",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode an image's per-class strings (ClassId 1..n in order) into one (n, H, W) array.

    All classes are filled by a single ``np.repeat`` over the concatenated runs.

    Args:
        rles: one string per class, empty where the class is absent.
        out: optional preallocated (n, height, width) uint8 array, best made by ``empty_masks``
            (any layout works; that one is a plain copy).

    Returns:
        ``out`` if given, else a new (n, height, width) uint8 array.
    """
    lengths = [
        run_lengths(rle, height, width, image_id=image_id, class_id=c + 1)
        for c, rle in enumerate(rles)
    ]
    values = np.concatenate([_values(k.size) for k in lengths])
    masks = np.repeat(values, np.concatenate(lengths)).reshape(len(rles), width, height)
    masks = masks.transpose(0, 2, 1)
    if out is None:
        return masks
    if out.shape != masks.shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {masks.shape}, got {out.dtype} {out.shape}")
    np.copyto(out, masks)
    return out


def decode_bits(rles: Sequence[str], height: int, width: int, *, image_id: str = "") -> np.ndarray:
    """Decode an image's per-class strings into one (H, W) uint8 array with bit c set where
    class c + 1 is, the training pipeline's mask, Fortran-ordered like ``decode``.

    Absent classes cost nothing and each present one a fill and an OR over contiguous memory:
    7x faster than ``decode_classes`` followed by packing its four strided masks.
    """
    bits = np.zeros(height * width, dtype=np.uint8)
    for c, text in enumerate(rles):
        lengths = run_lengths(text, height, width, image_id=image_id, class_id=c + 1)
        if lengths.size > 1:
            bits |= np.repeat(_values(lengths.size) << np.uint8(c), lengths)
    return bits.reshape(width, height).T


def area(rle: str, height: int, width: int) -> int:
    """Number of pixels in a valid string's mask, without decoding it."""
    return int(run_lengths(rle, height, width)[1::2].sum())


def run_bounds(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (starts, ends) pixel offsets, ends exclusive, of ``run_lengths``' runs."""
    bounds = np.cumsum(lengths)
    return bounds[0:-1:2], bounds[1::2]


def overlap(a: np.ndarray, b: np.ndarray) -> int:
    """Pixels inside both of two masks given as ``run_lengths`` of the same image, without
    decoding either: a sweep over the runs' ends, O(runs log runs)."""
    (a_start, a_end), (b_start, b_end) = run_bounds(a), run_bounds(b)
    if not a_start.size or not b_start.size:
        return 0
    points = np.concatenate([a_start, a_end, b_start, b_end])
    steps = np.repeat(np.array([1, -1, 1, -1], np.int64), [a_start.size] * 2 + [b_start.size] * 2)
    order = np.argsort(points, kind="stable")
    inside = np.cumsum(steps[order])[:-1]  # masks covering each gap between sorted points
    return int(np.diff(points[order])[inside == 2].sum())


def encode(mask: np.ndarray) -> str:
    """Encode an (H, W) mask (nonzero = inside) as an EncodedPixels string; '' when empty."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    inside = mask.ravel(order="F") != 0
    edges = np.flatnonzero(inside[1:] != inside[:-1]) + 1
    if inside.size and inside[0]:
        edges = np.concatenate(([0], edges))
    if inside.size and inside[-1]:
        edges = np.concatenate((edges, [inside.size]))
    pairs = edges.reshape(-1, 2)
    pairs[:, 1] -= pairs[:, 0]
    pairs[:, 0] += 1
    return " ".join(map(str, pairs.ravel().tolist()))
