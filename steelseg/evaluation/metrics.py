"""The Kaggle score and its parts, kept as sums that DDP ranks add up before any mean.

The Kaggle metric is the mean Dice over every (image, class) pair, with Dice 1 where both the
prediction and the truth are empty. ``DiceCounts`` accumulates, per class, sums over pairs
(number of pairs, sum of Dice, the same over pairs whose truth is non-empty, empty-truth pairs,
and image-level presence hits), so batches and ranks combine by addition and the score is
computed once at the end.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


def pair_sums(pred: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Intersection, predicted and true pixel counts per (image, class) pair.

    Shape:
        pred, true: (N, C, H, W) binary masks (bool or 0/1). Returns three (N, C) float64 tensors.
    """
    pred = pred.bool().flatten(2)
    true = true.bool().flatten(2)
    intersection = (pred & true).sum(-1, dtype=torch.float64)
    return intersection, pred.sum(-1, dtype=torch.float64), true.sum(-1, dtype=torch.float64)


def pair_dice(
    intersection: torch.Tensor, pred_sum: torch.Tensor, true_sum: torch.Tensor
) -> torch.Tensor:
    """Dice of each pair, 1 where prediction and truth are both empty."""
    total = pred_sum + true_sum
    return torch.where(total > 0, 2 * intersection / total.clamp(min=1), torch.ones_like(total))


FIELDS = (
    "pairs",
    "dice_sum",
    "nonempty_pairs",
    "nonempty_dice_sum",
    "empty_pairs",
    "pred_present",
    "true_present",
    "both_present",
)


@dataclass
class Scores:
    kaggle_dice: float
    dice_per_class: list[float]
    dice_nonempty: float
    dice_nonempty_per_class: list[float]
    empty_baseline: float
    presence_precision: list[float]
    presence_recall: list[float]

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat names for logging: kaggle_dice, dice_class_1, ..., presence_recall_class_4."""
        out = {
            f"{prefix}kaggle_dice": self.kaggle_dice,
            f"{prefix}dice_nonempty": self.dice_nonempty,
            f"{prefix}empty_baseline": self.empty_baseline,
        }
        for name in ("dice_per_class", "dice_nonempty_per_class"):
            for c, value in enumerate(getattr(self, name), start=1):
                out[f"{prefix}{name.removesuffix('_per_class')}_class_{c}"] = value
        for name in ("presence_precision", "presence_recall"):
            for c, value in enumerate(getattr(self, name), start=1):
                out[f"{prefix}{name}_class_{c}"] = value
        return out


class DiceCounts:
    """Per-class sums over (image, class) pairs; add batches with ``update``, ranks with
    ``all_reduce``, then ``compute``."""

    def __init__(self, n_classes: int = 4, device: torch.device | str = "cpu"):
        self.totals = torch.zeros(len(FIELDS), n_classes, dtype=torch.float64, device=device)

    def update(self, pred: torch.Tensor, true: torch.Tensor) -> None:
        """Add a batch of binary masks, shape (N, C, H, W)."""
        self.add_pairs(*pair_sums(pred, true))

    def add_pairs(
        self, intersection: torch.Tensor, pred_sum: torch.Tensor, true_sum: torch.Tensor
    ) -> None:
        """Add pairs given by their pixel counts, each (N, C) float64 (``pair_sums``' output)."""
        dice = pair_dice(intersection, pred_sum, true_sum)
        nonempty = true_sum > 0
        pred_present = pred_sum > 0
        batch = torch.stack(
            [
                torch.ones_like(dice),
                dice,
                nonempty.double(),
                dice * nonempty,
                (~nonempty).double(),
                pred_present.double(),
                nonempty.double(),
                (pred_present & nonempty).double(),
            ]
        ).sum(dim=1)
        self.totals += batch.to(self.totals.device)

    def merge(self, other: "DiceCounts") -> None:
        self.totals += other.totals.to(self.totals.device)

    def all_reduce(self) -> None:
        """Sum the counts of every DDP rank (no-op outside a process group)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.totals, op=dist.ReduceOp.SUM)

    def compute(self) -> Scores:
        t = dict(zip(FIELDS, self.totals.cpu()))

        def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
            return torch.where(den > 0, num / den.clamp(min=1), torch.full_like(num, float("nan")))

        return Scores(
            kaggle_dice=float(t["dice_sum"].sum() / max(float(t["pairs"].sum()), 1.0)),
            dice_per_class=ratio(t["dice_sum"], t["pairs"]).tolist(),
            dice_nonempty=float(ratio(t["nonempty_dice_sum"].sum(), t["nonempty_pairs"].sum())),
            dice_nonempty_per_class=ratio(t["nonempty_dice_sum"], t["nonempty_pairs"]).tolist(),
            empty_baseline=float(t["empty_pairs"].sum() / max(float(t["pairs"].sum()), 1.0)),
            presence_precision=ratio(t["both_present"], t["pred_present"]).tolist(),
            presence_recall=ratio(t["both_present"], t["true_present"]).tolist(),
        )
