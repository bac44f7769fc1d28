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


def test_dice_over_the_batch_pools_the_pairs_of_a_class():
    # image 0: a 4-pixel defect found exactly; image 1: clean, 4 pixels wrongly marked
    t = torch.zeros(2, 1, 4, 4)
    t[0, 0, 0, :] = 1
    logits = torch.full_like(t, -30.0)
    logits[0, 0, 0, :] = 30.0
    logits[1, 0, 3, :] = 30.0
    # per pair: (8 + 1) / (8 + 1) = 1 and (0 + 1) / (4 + 1) = 0.2, mean 0.6
    assert soft_dice_loss(logits, t).item() == pytest.approx(0.4, abs=1e-6)
    # over the batch: (2 * 4 + 1) / (4 + 4 + 4 + 1) = 9 / 13
    assert soft_dice_loss(logits, t, over="batch").item() == pytest.approx(4 / 13, abs=1e-6)
    loss = DiceBCELoss(bce_weight=0.0, dice_over="batch")
    assert loss(logits, t).item() == pytest.approx(4 / 13, abs=1e-6)


def test_dice_over_the_batch_is_per_class():
    # class 0 found exactly on image 0, class 1 all wrong on image 1: classes average, not pool
    t = torch.zeros(2, 2, 4, 4)
    t[0, 0, 0, :] = 1
    t[1, 1, 1, :] = 1
    logits = torch.full_like(t, -30.0)
    logits[0, 0, 0, :] = 30.0
    logits[1, 1, 2, :] = 30.0
    # class 0: 9 / 9; class 1: 1 / (4 + 4 + 1)
    expected = 1 - (1 + 1 / 9) / 2
    assert soft_dice_loss(logits, t, over="batch").item() == pytest.approx(expected, abs=1e-6)


def test_unknown_dice_over_is_rejected():
    with pytest.raises(ValueError, match="dice_over must be one of pair, batch"):
        DiceBCELoss(dice_over="image")


def test_the_config_chooses_the_dice():
    from steelseg.config import TrainConfig
    from steelseg.training import recipe

    t = torch.zeros(2, 4, 4, 4)
    t[0, :, 0, :] = 1
    logits = (t * 2 - 1) * 30
    logits[1, :, 3, :] = 30.0
    for over, expected in (("pair", 0.4), ("batch", 4 / 13)):
        loss = recipe.build_loss(TrainConfig(bce_weight=0.0, dice_weight=1.0, dice_over=over))
        assert loss(logits, t).item() == pytest.approx(expected, abs=1e-6)
