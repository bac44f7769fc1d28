import math

import numpy as np
import pytest
import torch

from steelseg.errors import SteelsegError
from steelseg.inference import postprocess
from steelseg.inference.postprocess import ClassRule, Rules, apply_rule, remove_small_components


def blob_probs(h=32, w=160) -> np.ndarray:
    """A 10x10 square at 0.9, a 2x2 speck at 0.8, background 0.1."""
    p = np.full((h, w), 0.1, np.float32)
    p[5:15, 20:30] = 0.9
    p[25:27, 100:102] = 0.8
    return p


def test_threshold_min_area_components_and_gate():
    p = blob_probs()
    assert apply_rule(p, ClassRule(0.5)).sum() == 104
    assert apply_rule(p, ClassRule(0.85)).sum() == 100
    assert apply_rule(p, ClassRule(0.5, min_component=5)).sum() == 100  # the speck goes
    assert apply_rule(p, ClassRule(0.5, min_area=105)).sum() == 0  # whole class dropped
    assert apply_rule(p, ClassRule(0.5, min_area=104)).sum() == 104
    assert apply_rule(p, ClassRule(0.5, gate=0.95)).sum() == 0  # peak 0.9 < gate
    assert apply_rule(p, ClassRule(0.5, gate=0.85)).sum() == 104


def test_remove_small_components_uses_8_connectivity():
    mask = np.zeros((8, 8), np.uint8)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = 1  # one diagonal component of 3
    mask[6, 6] = 1
    kept = remove_small_components(mask, 2)
    assert kept.sum() == 3 and kept[6, 6] == 0


def test_areas_rescale_to_the_predicted_image_size():
    rules = Rules((ClassRule(0.5, min_area=100, min_component=10),) * 4, image_size=(32, 160))
    scaled = rules.for_size(64, 320)
    assert scaled.classes[0].min_area == 400 and scaled.classes[0].min_component == 40
    assert rules.for_size(32, 160) is rules


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"classes": [{"threshold": 1.5}] * 4}, "threshold must be in"),
        ({"classes": [{}] * 3}, "4 classes needed"),
        ({"classes": [{"thresh": 0.5}] * 4}, "unexpected keyword"),
        ({}, "classes"),
        ({"classes": [{"threshold": math.nan}] * 4}, "threshold must be in"),
        ({"classes": [{"gate": math.inf}] * 4}, "gate must be in"),
        (
            {"classes": [{"min_area": math.nan}] * 4},
            "min_area must be a whole number >= 0, got nan",
        ),
        ({"classes": [{"min_component": 2.5}] * 4}, "min_component must be a whole number"),
        ({"classes": [{}] * 4, "image_size": [0, 160]}, r"image_size must be \[height, width\]"),
        ({"classes": [{}] * 4, "image_size": [math.nan, 160]}, "image_size must be"),
    ],
)
def test_bad_rules_are_an_error_naming_the_file(data, message):
    with pytest.raises(SteelsegError, match=f"rules.json: bad post-processing rules.*{message}"):
        Rules.from_dict(data, "rules.json")


def test_calibrate_finds_the_threshold_area_and_gate_that_fit_the_truth():
    rng = np.random.default_rng(0)
    probs, truth = [], []
    for i in range(40):
        p = rng.uniform(0, 0.3, (4, 32, 160)).astype(np.float32)
        t = np.zeros((4, 32, 160), np.uint8)
        if i % 2:  # class 1: the defect is where p > 0.7, and pixels in (0.55, 0.7) are wrong
            p[0, 4:20, 10:60] = 0.8
            p[0, 20:24, 10:60] = 0.6
            t[0, 4:20, 10:60] = 1
        else:  # clean image with a faint false alarm of class 2 (peak 0.65)
            p[1, 0:4, 0:4] = 0.65
        if i % 4 == 1:  # class 2 real defect, peak 0.95
            p[1, 10:30, 100:150] = 0.95
            t[1, 10:30, 100:150] = 1
        probs.append(p)
        truth.append(t)
    rules, report = postprocess.search_rules(probs, truth)
    first, second = rules.classes[0], rules.classes[1]
    assert 0.6 <= first.threshold < 0.8
    assert second.gate > 0.65 or second.min_area > 16 or second.min_component > 16
    assert report["dice_per_class_after"][0] == pytest.approx(1.0)
    assert report["dice_per_class_after"][1] == pytest.approx(1.0)
    assert report["kaggle_dice_before"] < report["kaggle_dice_after"] == pytest.approx(1.0)
    assert rules.image_size == (32, 160)
    masks = rules.apply(probs[1])
    assert (masks == truth[1]).all()


def test_batch_rules_match_the_per_class_rule():
    rng = np.random.default_rng(1)
    probs = rng.random((3, 4, 32, 160)).astype(np.float32) ** 3
    probs[1, 2] = 0.05  # an empty class
    rules = Rules(
        (
            ClassRule(0.5),
            ClassRule(0.6, min_area=900),
            ClassRule(0.4, min_component=3, min_area=50),
            ClassRule(0.3, gate=0.999),
        )
    )
    masks, present = rules.apply_batch(torch.from_numpy(probs))
    for b in range(3):
        for c in range(4):
            expected = apply_rule(probs[b, c], rules.classes[c])
            assert (masks[b, c] == expected).all()
            assert present[b, c] == expected.any()
    assert present.any() and not present.all()


def test_calibration_needs_one_image_size():
    search = postprocess.Calibration()
    search.add(np.zeros((4, 32, 160), np.float32), np.zeros((4, 32, 160), np.uint8))
    with pytest.raises(SteelsegError, match=r"one size needed, got \(64, 320\) after \(32, 160\)"):
        search.add(np.zeros((4, 64, 320), np.float32), np.zeros((4, 64, 320), np.uint8))
    with pytest.raises(SteelsegError, match="no validation images"):
        postprocess.Calibration().result()
