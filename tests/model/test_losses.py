import math

import pytest
import torch

from steelseg.model.losses import DiceBCELoss, bce_loss, soft_dice_loss


def target():
    t = torch.zeros(2, 4, 32, 32)
    t[0, 2, 4:20, 4:28] = 1
    t[1, 0, 10:14, 10:14] = 1
    return t


def test_perfect_better_than_good_better_than_bad():
    loss = DiceBCELoss()
    t = target()
    perfect = loss((t * 2 - 1) * 20, t)
    good = loss((t * 2 - 1) * 2 + 0.3 * torch.randn_like(t), t)
    bad = loss((1 - 2 * t) * 2, t)
    assert perfect < good < bad
    assert perfect.item() < 0.01


def test_finite_on_all_empty_masks():
    t = torch.zeros(2, 4, 32, 32)
    value = DiceBCELoss()(torch.randn(2, 4, 32, 32), t)
    assert torch.isfinite(value)
    assert DiceBCELoss()(torch.full_like(t, -20.0), t).item() < 0.01


def test_hand_computed_value():
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    t = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    # BCE: ln 2 at every pixel. Dice: (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5.
    assert bce_loss(logits, t).item() == pytest.approx(math.log(2))
    assert soft_dice_loss(logits, t).item() == pytest.approx(0.5)
    assert DiceBCELoss()(logits, t).item() == pytest.approx(math.log(2) + 0.5)
    weighted = DiceBCELoss(bce_weight=0.75, dice_weight=0.25)(logits, t)
    assert weighted.item() == pytest.approx(0.75 * math.log(2) + 0.25 * 0.5)


def test_positive_weight_per_class():
    logits = torch.zeros(1, 2, 1, 2)
    t = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]])
    value = bce_loss(logits, t, torch.tensor([3.0, 1.0]))
    # class 1: (3 ln2 + ln2) / 2, class 2: (ln2 + ln2) / 2, mean over the 4 pixels
    assert value.item() == pytest.approx((4 * math.log(2) + 2 * math.log(2)) / 4)
    loss = DiceBCELoss(dice_weight=0.0, pos_weight=[3.0, 1.0])
    assert loss(logits, t).item() == pytest.approx(value.item())


def test_safe_under_bf16_autocast():
    t = target()
    logits = ((t * 2 - 1) * 30).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = DiceBCELoss()(logits, t)
    assert value.dtype == torch.float32 and torch.isfinite(value) and value.item() < 0.01


def test_bad_weights_are_rejected():
    with pytest.raises(ValueError, match="loss weights"):
        DiceBCELoss(bce_weight=0.0, dice_weight=0.0)
    with pytest.raises(ValueError, match="loss weights"):
        DiceBCELoss(bce_weight=-1.0)
