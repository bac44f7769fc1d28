"""Weighted BCE + soft Dice on logits: pure functions, and the module that training uses.

Both terms are computed in float32 from logits, so they are safe under autocast (the paper's
sigmoid followed by BCE is not: it saturates in half precision).
"""

import torch
import torch.nn.functional as F
from torch import nn

from steelseg.config import DICE_OVER


def bce_loss(
    logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean binary cross-entropy over every pixel and class.

    Shape:
        logits, targets: (N, C, H, W); pos_weight: (C,), the weight of positive pixels per class.
    """
    if pos_weight is not None:
        pos_weight = pos_weight.to(logits.device, torch.float32).view(-1, 1, 1)
    return F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=pos_weight
    )


def soft_dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0, over: str = "pair"
) -> torch.Tensor:
    """1 - mean soft Dice, per (image, class) pair or per class over the batch.

    ``over="pair"``: per pair (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth), with
    p = sigmoid(logits), averaged over pairs. A pair whose truth is empty scores near 1 only if the
    prediction is near empty, as in the Kaggle metric; so every empty pair of a rare class pulls
    its probabilities towards zero as hard as a defect pulls them up.
    ``over="batch"``: the same sums taken per class over the whole batch, then averaged over the
    classes (smp's ``DiceLoss`` does this): a clean image adds its false positives to the class's
    denominator instead of scoring a pair of its own.

    Shape:
        logits, targets: (N, C, H, W).
    """
    if over not in DICE_OVER:
        raise ValueError(f"soft Dice over must be one of {', '.join(DICE_OVER)}, got {over!r}")
    probs = torch.sigmoid(logits.float()).flatten(2)
    targets = targets.float().flatten(2)
    dims = (0, 2) if over == "batch" else (2,)
    intersection = (probs * targets).sum(dims)
    total = probs.sum(dims) + targets.sum(dims)
    return 1.0 - ((2.0 * intersection + smooth) / (total + smooth)).mean()


def presence_loss(presence_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE of per-class presence logits against whether each (image, class) has a pixel.

    Shape:
        presence_logits: (N, C); targets: (N, C, H, W).
    """
    present = targets.flatten(2).amax(-1).float()
    return F.binary_cross_entropy_with_logits(presence_logits.float(), present)


class DiceBCELoss(nn.Module):
    """``bce_weight * BCE + dice_weight * (1 - soft Dice)`` on logits.

    Args:
        bce_weight, dice_weight: the terms' weights (what Ray Tune searches).
        smooth: Dice smoothing, which also sets how much an empty pair rewards an empty prediction.
        pos_weight: optional weight of positive pixels per class for the BCE term.
        presence_weight: weight of the presence head's BCE, when the logits come with one.
        dice_over: "pair" (per image and class) or "batch" (per class over the batch).
    """

    pos_weight: torch.Tensor | None  # a buffer: it moves with the module to its device

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
        pos_weight: list[float] | None = None,
        presence_weight: float = 0.0,
        dice_over: str = "pair",
    ):
        super().__init__()
        if bce_weight < 0 or dice_weight < 0 or bce_weight + dice_weight == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, "
                f"got bce {bce_weight}, dice {dice_weight}"
            )
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth
        self.presence_weight = presence_weight
        if dice_over not in DICE_OVER:
            raise ValueError(f"dice_over must be one of {', '.join(DICE_OVER)}, got {dice_over!r}")
        self.dice_over = dice_over
        self.register_buffer(
            "pos_weight",
            None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float32),
        )

    def forward(
        self, logits: torch.Tensor | tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor
    ) -> torch.Tensor:
        """``logits``: pixel logits, or (pixel logits, presence logits (N, C)) from a model with
        a presence head in training, whose BCE against "the class has a pixel" is added with
        ``presence_weight``."""
        presence = None
        if isinstance(logits, tuple):
            logits, presence = logits
        loss = logits.new_zeros((), dtype=torch.float32)
        if presence is not None and self.presence_weight:
            loss = loss + self.presence_weight * presence_loss(presence, targets)
        if self.bce_weight:
            loss = loss + self.bce_weight * bce_loss(logits, targets, self.pos_weight)
        if self.dice_weight:
            dice = soft_dice_loss(logits, targets, self.smooth, self.dice_over)
            loss = loss + self.dice_weight * dice
        return loss
