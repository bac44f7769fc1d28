"""A synthetic data set in the exact Severstal layout, with the real data's statistics.

``DATA_DIR/train.csv`` (current format) and ``DATA_DIR/train_images/*.jpg`` (3 identical
channels). About 47% of images are defect-free, masks fall 13/3/73/11% on classes 1-4, and each
class has its own look and typical area (../shared/DATA.md):

1. small pits and spots in clusters (1.1% of the image),
2. short vertical scratches (0.8%),
3. scratches and patches of every size, brighter or darker (6.2%),
4. large rough areas, mostly dark (8.4%).

The steel itself has vertical streaks, mottling, brightness from near-black to light grey,
sometimes the black strip edge, and unlabelled specks and streaks, as the real images have.

With ``modalities=("visible", "ir")`` a second image per id goes to ``train_images_ir/``: a
smooth heat map in which every defect shows, while about a third of the defects are all but
invisible in the visible image. That is the signal that fusion of modalities can add.
"""

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from steelseg.data import rle
from steelseg.data.catalog import modality_dir
from steelseg.errors import SteelsegError
from steelseg.storage import locate

DEFECT_FREE = 0.47
CLASS_SHARE = np.array([897, 247, 5150, 801]) / 7095
CLASS_COUNT_SHARE = np.array([6239, 425, 2]) / 6666
HIDDEN_FROM_VISIBLE = 0.35
MODALITIES = ("visible", "ir")


@dataclass(frozen=True)
class SynthSpec:
    height: int = 256
    width: int = 1600
    seed: int = 0
    modalities: tuple[str, ...] = ("visible",)


@dataclass
class Defect:
    class_id: int
    mask: np.ndarray
    hidden: bool


def image_id(seed: int, index: int) -> str:
    """A Kaggle-like 9-hex-digit name, the same for the same seed and index."""
    return hashlib.sha1(f"steelseg-{seed}-{index}".encode()).hexdigest()[:9] + ".jpg"


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]):
    """Zero-mean, unit-std noise varying over about ``cells`` (rows, cols) cells."""
    coarse = rng.standard_normal((max(cells[0], 2), max(cells[1], 2))).astype(np.float32)
    fine = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return (fine - fine.mean()) / (fine.std() + 1e-6)


def steel_surface(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Grey rolled steel: brightness, vertical streaks, mottling, grain, maybe the strip edge."""
    base = rng.uniform(25, 170)
    columns = _smooth_noise(rng, (1, width), (1, width // 8))[0] * rng.uniform(3, 14)
    streaks = _smooth_noise(rng, (height, width), (3, width // 3)) * rng.uniform(1, 6)
    mottle = _smooth_noise(rng, (height, width), (height // 8, width // 8)) * rng.uniform(0, 12)
    shading = _smooth_noise(rng, (height, width), (2, 4)) * rng.uniform(2, 15)
    grain = rng.standard_normal((height, width)).astype(np.float32) * rng.uniform(2, 6)
    surface = base + columns[None, :] + streaks + mottle + shading + grain
    _add_distractors(rng, surface)
    if rng.random() < 0.15:
        edge = int(width * rng.uniform(0.03, 0.25))
        side = slice(0, edge) if rng.random() < 0.5 else slice(width - edge, width)
        surface[:, side] = rng.uniform(0, 15) + grain[:, side] * 0.5
    return surface


def _add_distractors(rng: np.random.Generator, surface: np.ndarray) -> None:
    """Unlabelled marks: a few long faint vertical lines and, rarely, specks."""
    height, width = surface.shape
    for _ in range(rng.poisson(2)):
        x = rng.integers(width)
        surface[:, x] -= rng.uniform(3, 12)
    if rng.random() < 0.1:
        for _ in range(rng.integers(1, 8)):
            y, x = rng.integers(height), rng.integers(width)
            r = max(1, round(height * rng.uniform(0.004, 0.012)))
            cv2.circle(surface, (int(x), int(y)), r, float(rng.uniform(150, 230)), -1)


def _blob(rng: np.random.Generator, shape, center, radii, angle: float) -> np.ndarray:
    """An irregular filled polygon around ``center`` with about the given radii (x, y)."""
    n = 20
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    wobble = 1 + 0.3 * np.convolve(rng.standard_normal(n + 4), np.ones(5) / 5, "valid")
    x = radii[0] * wobble * np.cos(theta)
    y = radii[1] * wobble * np.sin(theta)
    c, s = np.cos(angle), np.sin(angle)
    points = np.stack([center[0] + c * x - s * y, center[1] + s * x + c * y], axis=1)
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask


def _random_center(rng, height, width):
    return rng.uniform(0, width), rng.uniform(0, height)


def _pits(rng, height, width):
    """Class 1: clusters of small bright or dark pits; the mask is drawn around each cluster."""
    mask = np.zeros((height, width), np.uint8)
    look = np.zeros((height, width), np.float32)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    for _ in range(1 + rng.poisson(2.4)):
        r = height * rng.uniform(0.04, 0.12)
        center = _random_center(rng, height, width)
        region = _blob(rng, (height, width), center, (r * rng.uniform(0.7, 1.5), r), 0.0)
        mask |= region
        ys, xs = np.nonzero(region)
        for k in rng.choice(len(ys), size=min(len(ys), rng.integers(4, 16)), replace=False):
            radius = max(1, round(height * rng.uniform(0.004, 0.016)))
            cv2.circle(look, (int(xs[k]), int(ys[k])), radius, sign * rng.uniform(25, 90), -1)
    return mask, look


def _vertical_scratches(rng, height, width):
    """Class 2: short vertical scratches, a few thin dark lines in a narrow band."""
    mask = np.zeros((height, width), np.uint8)
    look = np.zeros((height, width), np.float32)
    for _ in range(1 + rng.poisson(0.3)):
        band_w = max(3, round(height * rng.uniform(0.03, 0.08)))
        band_h = round(height * rng.uniform(0.25, 0.85))
        x0 = rng.integers(0, max(1, width - band_w))
        y0 = rng.integers(0, max(1, height - band_h))
        mask[y0 : y0 + band_h, x0 : x0 + band_w] = 1
        for _ in range(rng.integers(1, 4)):
            x = int(x0 + rng.integers(band_w))
            thickness = max(1, round(height * rng.uniform(0.003, 0.01)))
            cv2.line(look, (x, y0), (x, y0 + band_h - 1), -rng.uniform(25, 70), thickness)
        look[y0 : y0 + band_h, x0 : x0 + band_w] -= rng.uniform(3, 12)
    return mask, look


def _scratches_and_patches(rng, height, width):
    """Class 3: long scratches at any angle and patches of every size, brighter or darker."""
    mask = np.zeros((height, width), np.uint8)
    look = np.zeros((height, width), np.float32)
    for _ in range(1 + rng.poisson(1.8)):
        area = height * width * np.exp(rng.uniform(np.log(0.001), np.log(0.12)))
        sign = 1.0 if rng.random() < 0.55 else -1.0
        if rng.random() < 0.4:
            length = min(width, np.sqrt(area) * rng.uniform(3, 8))
            radii = (length / 2, area / (np.pi * length / 2))
            angle = rng.uniform(-0.35, 0.35)
        else:
            aspect = rng.uniform(0.5, 2.5)
            radii = (np.sqrt(area / np.pi * aspect), np.sqrt(area / np.pi / aspect))
            angle = rng.uniform(-np.pi, np.pi)
        region = _blob(rng, (height, width), _random_center(rng, height, width), radii, angle)
        texture = _smooth_noise(rng, (height, width), (height // 4, width // 16))
        look += region * sign * (rng.uniform(15, 50) + 10 * texture)
        mask |= region
    return mask, look


def _rough_areas(rng, height, width):
    """Class 4: large rough areas, mostly dark, with coarse grain."""
    mask = np.zeros((height, width), np.uint8)
    look = np.zeros((height, width), np.float32)
    for _ in range(1 + rng.poisson(1.4)):
        area = height * width * rng.uniform(0.01, 0.08)
        aspect = rng.uniform(0.6, 3.0)
        radii = (np.sqrt(area / np.pi * aspect), np.sqrt(area / np.pi / aspect))
        region = _blob(rng, (height, width), _random_center(rng, height, width), radii, 0.0)
        grain = _smooth_noise(rng, (height, width), (height // 3, width // 3))
        sign = -1.0 if rng.random() < 0.8 else 1.0
        look += region * (sign * rng.uniform(25, 60) + rng.uniform(10, 25) * grain)
        mask |= region
    return mask, look


DRAW = {1: _pits, 2: _vertical_scratches, 3: _scratches_and_patches, 4: _rough_areas}


def choose_classes(rng: np.random.Generator) -> list[int]:
    """The classes an image has: none for 47%, then one, two or three as in the real data."""
    if rng.random() < DEFECT_FREE:
        return []
    n = 1 + rng.choice(3, p=CLASS_COUNT_SHARE)
    return sorted(1 + rng.choice(4, size=n, replace=False, p=CLASS_SHARE))


def make_image(spec: SynthSpec, index: int) -> tuple[dict[str, np.ndarray], list[Defect]]:
    """One sample: a uint8 (H, W) image per modality and its defects (non-overlapping masks)."""
    rng = np.random.default_rng([spec.seed, index])
    h, w = spec.height, spec.width
    surface = steel_surface(rng, h, w)
    heat = _smooth_noise(rng, (h, w), (2, 6)) * 12 + 90
    occupied = np.zeros((h, w), np.uint8)
    defects = []
    hide_share = HIDDEN_FROM_VISIBLE if "ir" in spec.modalities else 0.0
    for class_id in choose_classes(rng):
        mask, look = DRAW[class_id](rng, h, w)
        mask &= 1 - occupied
        if not mask.any():
            continue
        hidden = rng.random() < hide_share
        soft_edges = cv2.GaussianBlur(look * mask, (0, 0), max(0.5, h / 256))
        surface += soft_edges * (0.1 if hidden else 1.0)
        heat += cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(1.0, h / 64)) * 60
        occupied |= mask
        defects.append(Defect(class_id, mask, hidden))
    heat += rng.standard_normal((h, w)).astype(np.float32) * 3
    images = {"visible": _to_uint8(surface), "ir": _to_uint8(heat)}
    return {m: images[m] for m in spec.modalities}, defects


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0, 255).astype(np.uint8)


def _write_one(args: tuple[SynthSpec, int, str]) -> list[tuple[str, int, str]]:
    spec, index, out = args
    name = image_id(spec.seed, index)
    images, defects = make_image(spec, index)
    for modality, gray in images.items():
        rgb = np.repeat(gray[:, :, None], 3, axis=2)
        Image.fromarray(rgb).save(Path(out) / modality_dir(modality) / name, quality=92)
    return [(name, d.class_id, rle.encode(d.mask)) for d in defects]


def write_dataset(
    out: str | os.PathLike,
    n_images: int,
    *,
    height: int = 256,
    width: int = 1600,
    seed: int = 0,
    modalities: Sequence[str] = ("visible",),
    processes: int | None = None,
) -> Path:
    """Write ``n_images`` synthetic images and their ``train.csv`` under ``out``.

    Raises:
        SteelsegError: a bad size or modality, or an ``out`` that is not a new or empty
            folder, or cannot be written.
    """
    if height < 16 or width < 16:
        raise SteelsegError(f"image size {height}x{width} is too small (16x16 at least)")
    if n_images < 1:
        raise SteelsegError(f"a data set needs at least 1 image, got {n_images}")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown or not modalities or modalities[0] != "visible":
        raise SteelsegError(
            f"modalities {','.join(modalities)!r}: the first must be 'visible', "
            f"the others from {', '.join(MODALITIES[1:])}"
        )
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        # images left there (of another seed, say) would join the new set as defect-free ones
        raise SteelsegError(f"{out}: not an empty folder; synth writes into a new or empty one")
    locate(out, "synth folder").check_writable()
    for modality in modalities:
        (out / modality_dir(modality)).mkdir(parents=True, exist_ok=True)
    spec = SynthSpec(height, width, seed, tuple(modalities))
    jobs = [(spec, i, str(out)) for i in range(n_images)]
    with Pool(processes or os.cpu_count()) as pool:
        rows = [r for image_rows in pool.imap(_write_one, jobs, chunksize=16) for r in image_rows]
    _write_csv(out / "train.csv", rows)
    return out


def _write_csv(path: Path, rows: list[tuple[str, int, str]]) -> None:
    lines = ["ImageId,ClassId,EncodedPixels"]
    lines += [f"{name},{class_id},{encoded}" for name, class_id, encoded in sorted(rows)]
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
