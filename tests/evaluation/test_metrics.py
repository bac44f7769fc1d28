import numpy as np
import pytest
import torch

from steelseg.evaluation.metrics import DiceCounts, pair_dice, pair_sums


def masks(*pixel_sets, shape=(4, 4)):
    out = torch.zeros(len(pixel_sets), *shape, dtype=torch.bool)
    for i, pixels in enumerate(pixel_sets):
        for r, c in pixels:
            out[i, r, c] = True
    return out


def dice_of(pred, true):
    return pair_dice(*pair_sums(pred[None, None], true[None, None])).item()


def test_hand_computed_pairs():
    empty = masks([])[0]
    two = masks([(0, 0), (0, 1)])[0]
    one = masks([(0, 0)])[0]
    other = masks([(3, 3), (3, 2)])[0]
    assert dice_of(empty, empty) == 1.0
    assert dice_of(two, two) == 1.0
    assert dice_of(one, two) == pytest.approx(2 / 3)
    assert dice_of(masks([(0, 0), (1, 0)])[0], two) == pytest.approx(0.5)
    assert dice_of(two, other) == 0.0
    assert dice_of(two, empty) == 0.0 and dice_of(empty, two) == 0.0


def test_kaggle_score_and_parts():
    # 2 images x 2 classes: (perfect, both empty), (half overlap 2/3, false positive)
    true = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
    pred = torch.zeros_like(true)
    true[0, 0, 0, :2] = pred[0, 0, 0, :2] = True
    true[1, 0, 0, :2] = True
    pred[1, 0, 0, 0] = True
    pred[1, 1, 3, 3] = True
    counts = DiceCounts(n_classes=2)
    counts.update(pred, true)
    s = counts.compute()
    assert s.kaggle_dice == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
    assert s.dice_per_class == pytest.approx([(1 + 2 / 3) / 2, (1 + 0) / 2])
    assert s.dice_nonempty == pytest.approx((1 + 2 / 3) / 2)
    assert s.empty_baseline == pytest.approx(2 / 4)
    assert s.presence_precision == pytest.approx([1.0, 0.0])
    assert s.presence_recall[0] == 1.0 and np.isnan(s.presence_recall[1])
    named = s.as_dict("val_")
    assert named["val_kaggle_dice"] == pytest.approx(s.kaggle_dice)
    assert named["val_dice_class_2"] == pytest.approx(0.5)


def test_empty_prediction_scores_the_baseline():
    g = torch.Generator().manual_seed(0)
    true = torch.rand(8, 4, 16, 16, generator=g) > 0.97
    true[:4] = False
    counts = DiceCounts()
    counts.update(torch.zeros_like(true), true)
    s = counts.compute()
    assert s.kaggle_dice == pytest.approx(s.empty_baseline)
    assert s.empty_baseline == pytest.approx(float((true.flatten(2).sum(-1) == 0).double().mean()))


def test_split_batches_give_the_whole_batch_sums():
    g = torch.Generator().manual_seed(1)
    true = torch.rand(10, 4, 16, 16, generator=g) > 0.8
    pred = torch.rand(10, 4, 16, 16, generator=g) > 0.7
    true[::3] = False
    whole = DiceCounts()
    whole.update(pred, true)
    first, second = DiceCounts(), DiceCounts()
    first.update(pred[:3], true[:3])
    second.update(pred[3:], true[3:])
    first.merge(second)
    assert torch.allclose(first.totals, whole.totals)
    assert first.compute().kaggle_dice == pytest.approx(whole.compute().kaggle_dice)
    assert whole.totals[0].sum().item() == 40
