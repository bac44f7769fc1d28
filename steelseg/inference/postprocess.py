"""From per-class probabilities to masks: a threshold, a minimum total area, optional removal of
small connected components and an optional image-level gate, each set per class.

``search_rules`` (and ``Calibration``, its streaming form) finds these on a validation set for the
Kaggle Dice; ``steelseg.runs`` stores them with a checkpoint, and prediction uses them by default.
"""

import dataclasses
import itertools
import numbers

import cv2
import numpy as np
import torch

from steelseg.domain import N_CLASSES
from steelseg.errors import SteelsegError

# The grids calibrate searches. Areas are fractions of the image (at 256x1600, 0.001 is 410 px),
# so one grid serves any image size.
THRESHOLDS = (0.5, 0.3, 0.35, 0.4, 0.45, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)
AREA_FRACTIONS = (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.015)
COMPONENT_FRACTIONS = (0.0, 0.0002, 0.001)
GATES = (0.0, 0.6, 0.7, 0.8, 0.9, 0.95)


def _is_count(value) -> bool:
    """A whole number >= 0 (a NaN from a JSON file fails every comparison: not one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 0


@dataclasses.dataclass(frozen=True)
class ClassRule:
    """One class's post-processing.

    threshold: probability above which a pixel is the class.
    min_area: the class mask of an image is dropped when it has fewer pixels.
    min_component: connected components smaller than this many pixels are removed (0: off).
    gate: the class is kept on an image only if its highest probability there reaches this
        (0: off); it keeps predictions off clean images.
    """

    threshold: float = 0.5
    min_area: int = 0
    min_component: int = 0
    gate: float = 0.0

    def __post_init__(self):
        if not 0 < self.threshold < 1:
            raise SteelsegError(f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("min_area", "min_component"):
            if not _is_count(getattr(self, name)):
                raise SteelsegError(
                    f"{name} must be a whole number >= 0, got {getattr(self, name)}"
                )
        if not 0 <= self.gate < 1:
            raise SteelsegError(f"gate must be in [0, 1), got {self.gate}")


@dataclasses.dataclass(frozen=True)
class Rules:
    """Post-processing for the 4 classes, and the image size its pixel counts were set at."""

    classes: tuple[ClassRule, ...] = (ClassRule(),) * N_CLASSES
    image_size: tuple[int, int] | None = None  # (H, W) the areas were calibrated at

    def __post_init__(self):
        size = self.image_size
        if size is not None and not (len(size) == 2 and all(_is_count(v) and v for v in size)):
            raise SteelsegError(f"image_size must be [height, width] in pixels, got {size}")

    @classmethod
    def plain(cls, threshold: float = 0.5) -> "Rules":
        return cls((ClassRule(threshold),) * N_CLASSES)

    def for_size(self, height: int, width: int) -> "Rules":
        """Areas rescaled to another image size (calibrated on crops, predicted on full images)."""
        if self.image_size is None or self.image_size == (height, width):
            return self
        scale = height * width / (self.image_size[0] * self.image_size[1])
        return Rules(
            tuple(
                dataclasses.replace(
                    r,
                    min_area=round(r.min_area * scale),
                    min_component=round(r.min_component * scale),
                )
                for r in self.classes
            ),
            (height, width),
        )

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(4, H, W) probabilities -> (4, H, W) uint8 masks."""
        return self.apply_batch(torch.from_numpy(probs[None]))[0][0]

    def apply_batch(self, probs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(B, 4, H, W) probabilities on any device -> (B, 4, H, W) uint8 masks on the CPU and
        (B, 4) flags of the non-empty ones.

        Threshold, gate and areas run where the probabilities are (the GPU in prediction), and
        only non-empty masks cross to the host, where small components go (OpenCV).
        """
        rules = self.for_size(*probs.shape[2:])
        fields = ("threshold", "gate", "min_area")
        per_class = [[getattr(r, field) for r in rules.classes] for field in fields]
        threshold, gate, min_area = (
            torch.tensor(v, dtype=torch.float32, device=probs.device).view(1, -1) for v in per_class
        )
        masks = probs > threshold[..., None, None]
        area = masks.sum(dim=(2, 3))
        keep = (probs.amax(dim=(2, 3)) >= gate) & (area > 0)
        components = torch.tensor([r.min_component > 0 for r in rules.classes], device=probs.device)
        keep &= (area >= min_area) | components  # min_area after the components, below
        out = np.zeros(masks.shape, np.uint8)
        index = keep.nonzero().tolist()
        if index:
            b, c = zip(*index)
            out[list(b), list(c)] = masks[list(b), list(c)].to(torch.uint8).cpu().numpy()
        present = keep.cpu().numpy()
        for b, c in index:
            if rules.classes[c].min_component:
                out[b, c] = apply_rule_to_mask(out[b, c], rules.classes[c])
                present[b, c] = out[b, c].any()
        return out, present

    def to_dict(self) -> dict:
        return {
            "classes": [dataclasses.asdict(r) for r in self.classes],
            "image_size": list(self.image_size) if self.image_size else None,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "rules") -> "Rules":
        try:
            classes = tuple(ClassRule(**r) for r in data["classes"])
            size = data.get("image_size")
            if len(classes) != N_CLASSES:
                raise SteelsegError(f"{N_CLASSES} classes needed, got {len(classes)}")
            return cls(classes, tuple(size) if size else None)
        except (KeyError, TypeError, SteelsegError) as e:
            raise SteelsegError(f"{source}: bad post-processing rules ({e})") from None


def apply_rule(probs: np.ndarray, rule: ClassRule) -> np.ndarray:
    """One class: (H, W) probabilities -> (H, W) uint8 mask."""
    if rule.gate and probs.max() < rule.gate:
        return np.zeros(probs.shape, np.uint8)
    return apply_rule_to_mask((probs > rule.threshold).astype(np.uint8), rule)


def apply_rule_to_mask(mask: np.ndarray, rule: ClassRule) -> np.ndarray:
    """The component and area steps of a rule on a thresholded (H, W) uint8 mask."""
    if rule.min_component:
        mask = remove_small_components(mask, rule.min_component)
    if mask.sum() < rule.min_area:
        mask = np.zeros_like(mask)
    return mask


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Zero the 8-connected components of a binary mask with fewer than ``min_size`` pixels."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_size
    keep[0] = False  # background
    return keep[labels].astype(np.uint8) if n > 1 else mask


def _pair_dice(inter: np.ndarray, pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Kaggle's per-pair Dice: 1 where both masks are empty."""
    total = pred + true
    return np.where(total == 0, 1.0, 2 * inter / np.maximum(total, 1))


@dataclasses.dataclass(frozen=True)
class ImageStats:
    """What calibration keeps of one image: its size, per class, threshold and component size
    the predicted area and overlap with the truth (4, T, K, 2), the highest probability per class
    (4,) and the true area per class (4,)."""

    size: tuple[int, int]
    areas: np.ndarray
    peaks: np.ndarray
    true_areas: np.ndarray


def image_stats(probs: np.ndarray, truth: np.ndarray) -> ImageStats:
    """(4, H, W) probabilities and (4, H, W) binary truth of one image -> its ``ImageStats``."""
    pixels = probs.shape[1] * probs.shape[2]
    areas = np.zeros((N_CLASSES, len(THRESHOLDS), len(COMPONENT_FRACTIONS), 2))
    for c, (t, threshold) in itertools.product(range(N_CLASSES), enumerate(THRESHOLDS)):
        thresholded = (probs[c] > threshold).astype(np.uint8)
        if not thresholded.any():
            continue  # all zeros
        true = truth[c] > 0
        for k, fraction in enumerate(COMPONENT_FRACTIONS):
            min_component = round(fraction * pixels)
            mask = (
                remove_small_components(thresholded, min_component)
                if min_component
                else thresholded
            )
            areas[c, t, k] = mask.sum(), (mask & true).sum()
    return ImageStats(
        tuple(probs.shape[1:]),
        areas,
        probs.reshape(N_CLASSES, -1).max(axis=1),
        truth.reshape(N_CLASSES, -1).sum(axis=1).astype(np.float64),
    )


class Calibration:
    """The search of ``calibrate``, fed one image at a time: each image leaves only its areas
    and overlaps per class, threshold and component size, never its probabilities (6.5 MB an
    image at 256x1600), so a whole validation split fits in memory."""

    def __init__(self):
        self.size: tuple[int, int] | None = None
        self.stats: list[np.ndarray] = []  # per image (4, T, K, 2): predicted area, overlap
        self.peaks: list[np.ndarray] = []  # per image (4,): highest probability
        self.true_areas: list[np.ndarray] = []  # per image (4,)

    def add(self, probs: np.ndarray, truth: np.ndarray) -> None:
        """(4, H, W) probabilities and (4, H, W) binary truth of one image.

        Raises:
            SteelsegError: an image of another size than the first (areas are per size).
        """
        self.add_stats(image_stats(probs, truth))

    def add_stats(self, stats: "ImageStats") -> None:
        """One image's ``image_stats``, computed elsewhere (another process, say)."""
        if self.size is None:
            self.size = stats.size
        elif stats.size != self.size:
            raise SteelsegError(
                f"calibrate: images of one size needed, got {stats.size} after {self.size}"
            )
        self.stats.append(stats.areas)
        self.peaks.append(stats.peaks)
        self.true_areas.append(stats.true_areas)

    def result(self) -> tuple[Rules, dict]:
        """Per class, the rule with the best mean Dice over the images; on a tie the earlier
        grid entry wins (threshold 0.5, no area, no gate first). Returns the rules and a report:
        Dice per class with plain threshold 0.5 and calibrated."""
        if not self.stats:
            raise SteelsegError("calibrate: no validation images")
        assert self.size is not None  # set by the first image
        stats, peaks, true_areas = (np.stack(v) for v in (self.stats, self.peaks, self.true_areas))
        pixels = self.size[0] * self.size[1]
        rules: list[ClassRule] = []
        before: list[float] = []
        after: list[float] = []
        for c in range(N_CLASSES):
            best = (-1.0, ClassRule())  # the plain rule, beaten by the grid's first entry
            for (t, threshold), (k, component) in itertools.product(
                enumerate(THRESHOLDS), enumerate(COMPONENT_FRACTIONS)
            ):
                area, inter = stats[:, c, t, k, 0], stats[:, c, t, k, 1]
                if threshold == 0.5 and not component:
                    before.append(float(_pair_dice(inter, area, true_areas[:, c]).mean()))
                for fraction, gate in itertools.product(AREA_FRACTIONS, GATES):
                    if gate and gate <= threshold:
                        continue  # a gate at or below the threshold changes nothing
                    keep = (area >= fraction * pixels) & (peaks[:, c] >= gate)
                    dice = _pair_dice(inter * keep, area * keep, true_areas[:, c]).mean()
                    if dice > best[0] + 1e-12:
                        rule = ClassRule(
                            threshold, round(fraction * pixels), round(component * pixels), gate
                        )
                        best = (float(dice), rule)
            rules.append(best[1])
            after.append(best[0])
        report = {
            "images": len(self.stats),
            "dice_per_class_before": before,
            "dice_per_class_after": after,
            "kaggle_dice_before": float(np.mean(before)),
            "kaggle_dice_after": float(np.mean(after)),
        }
        return Rules(tuple(rules), self.size), report


def search_rules(probs: list[np.ndarray], truth: list[np.ndarray]) -> tuple[Rules, dict]:
    """``Calibration`` over lists of (4, H, W) probabilities and truths."""
    search = Calibration()
    for p, t in zip(probs, truth):
        search.add(p, t)
    return search.result()
