"""Mask overlays land where the masks are, in the class's colour, in TensorBoard's figure and in
the PNG figures."""

import numpy as np
from PIL import Image

from steelseg.evaluation import figures
from steelseg.evaluation.figures import CLASS_COLORS


def grey_image(height=32, width=64, value=100):
    return np.full((height, width, 3), value, np.uint8)


def blend(value, c, alpha=0.45):
    return ((1 - alpha) * value + alpha * CLASS_COLORS[c].astype(np.float32)).astype(np.uint8)


def test_overlay_colours_each_class_where_its_mask_is():
    masks = np.zeros((4, 32, 64), np.uint8)
    masks[0, 2:6, 3:9] = 1
    masks[3, 20:30, 40:60] = 1
    picture = figures.overlay(grey_image(), masks)
    assert picture.shape == (32, 64, 3) and picture.dtype == np.uint8
    np.testing.assert_array_equal(picture[4, 5], blend(100, 0))
    np.testing.assert_array_equal(picture[25, 50], blend(100, 3))
    np.testing.assert_array_equal(picture[15, 30], [100, 100, 100])  # no mask: grey
    outside = masks.sum(axis=0) == 0
    assert (picture[outside] == 100).all()


def test_truth_above_prediction_with_a_gap():
    truth = np.zeros((4, 32, 64), np.uint8)
    truth[2, :, :10] = 1
    pred = np.zeros((4, 32, 64), np.uint8)
    pred[1, :, 50:] = 1
    picture = figures.truth_vs_prediction([(grey_image(), truth, pred)] * 2, gap=4)
    assert picture.shape == (2 * 64 + 4, 64, 3)
    np.testing.assert_array_equal(picture[10, 5], blend(100, 2))  # truth row, left
    np.testing.assert_array_equal(picture[32 + 10, 55], blend(100, 1))  # prediction, right
    np.testing.assert_array_equal(picture[32 + 10, 5], [100, 100, 100])
    assert (picture[64:68] == 255).all()  # the gap between samples


def colour_columns(picture: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Columns of the picture holding pixels of about this colour."""
    near = np.abs(picture.astype(int) - colour.astype(int)).max(axis=2) <= 12
    return np.flatnonzero(near.any(axis=0))


def test_predictions_figure_draws_truth_and_prediction_where_they_are(tmp_path):
    truth = np.zeros((4, 32, 320), np.uint8)
    truth[0, 8:24, 10:60] = 1  # class 1, left
    pred = np.zeros((4, 32, 320), np.uint8)
    pred[3, 8:24, 260:310] = 1  # class 4, right
    path = figures.predictions_figure(
        [("a.jpg", grey_image(32, 320), truth, pred)], tmp_path / "f.png"
    )
    picture = np.asarray(Image.open(path).convert("RGB"))
    half = picture.shape[0] // 2
    red, yellow = blend(100, 0), blend(100, 3)
    top, low = picture[:half], picture[half:]
    top_red, top_yellow = colour_columns(top, red), colour_columns(top, yellow)
    low_red, low_yellow = colour_columns(low, red), colour_columns(low, yellow)
    assert len(top_red) and len(low_yellow)
    # the legend shows every colour below the panels; inside the panels, each mask in its place
    width = picture.shape[1]
    assert top_red.max() < width / 2 and not len(top_yellow)
    assert low_yellow.min() > width / 2
    assert not len([c for c in low_red if c > width / 2])
