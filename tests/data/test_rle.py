import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from steelseg.data import rle
from steelseg.errors import RLEError

H, W = 256, 1600


def real_rows(real_dir):
    return pd.read_csv(real_dir / "train.csv").itertuples()


def label(real_dir, image_id):
    return np.array(Image.open(real_dir / "labels" / image_id.replace(".jpg", ".png")))


def test_decode_equals_real_labels_pixel_for_pixel(real_dir):
    rows = list(real_rows(real_dir))
    assert len(rows) == 2
    for row in rows:
        truth = label(real_dir, row.ImageId) == row.ClassId
        mask = rle.decode(row.EncodedPixels, H, W)
        assert mask.shape == (H, W) and mask.dtype == np.uint8
        assert truth.sum() > 1000
        np.testing.assert_array_equal(mask, truth)


def test_encode_of_real_label_gives_csv_string(real_dir):
    for row in real_rows(real_dir):
        assert rle.encode(label(real_dir, row.ImageId) == row.ClassId) == row.EncodedPixels


def test_official_string_decodes_to_4396_pixels_and_reencodes(real_dir):
    official = (real_dir / "rle_0002cc93b_class1.txt").read_text().strip()
    mask = rle.decode(official, H, W, image_id="0002cc93b.jpg", class_id=1)
    assert int(mask.sum()) == 4396
    assert rle.encode(mask) == official


def test_column_major_one_indexed_convention():
    mask = rle.decode("1 2 257 1", 256, 3)
    assert mask[0, 0] == mask[1, 0] == 1 and mask[2, 0] == 0
    assert mask[0, 1] == 1 and mask.sum() == 3
    assert rle.encode(np.ascontiguousarray(mask)) == "1 2 257 1"


def test_empty_and_full_masks():
    assert rle.decode("", 4, 5).sum() == 0
    assert rle.encode(np.zeros((4, 5), np.uint8)) == ""
    assert rle.encode(np.ones((4, 5), np.uint8)) == "1 20"
    assert rle.decode("1 20", 4, 5).all()


def test_adjacent_runs_decode():
    assert rle.decode("1 2 3 2", 2, 3).sum() == 4


def masks(max_side: int, max_value: int):
    """uint8 arrays of any shape up to ``max_side`` a side, values 0..``max_value``."""
    side = st.integers(1, max_side)
    return st.tuples(side, side).flatmap(
        lambda shape: arrays(np.uint8, shape, elements=st.integers(0, max_value))
    )


@settings(max_examples=200, deadline=None)
@given(masks(40, 1))
def test_round_trip_random_masks(mask):
    encoded = rle.encode(mask)
    np.testing.assert_array_equal(rle.decode(encoded, *mask.shape), mask)
    assert rle.encode(rle.decode(encoded, *mask.shape)) == encoded


@settings(max_examples=100, deadline=None)
@given(masks(30, 15))
def test_decode_bits_of_each_class_string_gives_back_the_bits(bits):
    """Any overlap of the four classes: each pixel's value is its classes' bits."""
    strings = [rle.encode((bits >> c) & 1) for c in range(4)]
    np.testing.assert_array_equal(rle.decode_bits(strings, *bits.shape), bits)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.integers(1, 30), st.booleans())
def test_round_trip_empty_and_full(h, w, full):
    mask = np.full((h, w), int(full), np.uint8)
    assert rle.encode(mask) == (f"1 {h * w}" if full else "")
    np.testing.assert_array_equal(rle.decode(rle.encode(mask), h, w), mask)


@pytest.mark.parametrize(
    ("encoded", "reason"),
    [
        ("1 2 3", "odd number of tokens (3)"),
        ("1 2 x 4", "non-numeric token"),
        ("1 2.5", "non-numeric token"),
        ("1 0", "run 1 has length 0"),
        ("1 -3", "run 1 has length -3"),
        ("0 3", "run 1 starts at pixel 0"),
        ("9 2 1 2", "run 2 (start 1) is out of order"),
        ("1 5 3 2", "run 2 (start 3) is out of order or overlaps run 1"),
        ("16 2", "run 1 ends at pixel 17, past 16 pixels"),
    ],
)
def test_bad_strings_name_image_class_and_reason(encoded, reason):
    with pytest.raises(RLEError, match="image abc.jpg class 3") as info:
        rle.decode(encoded, 4, 4, image_id="abc.jpg", class_id=3)
    assert reason in str(info.value)


def test_run_exactly_to_the_end_is_valid():
    mask = rle.decode("15 2", 4, 4)
    assert mask.sum() == 2 and mask[2, 3] == mask[3, 3] == 1


def test_decode_classes_into_preallocated_array(real_dir):
    strings = {row.ClassId: row.EncodedPixels for row in real_rows(real_dir)}
    rles = [strings.get(c, "") for c in (1, 2, 3, 4)]
    out = rle.empty_masks(4, H, W)
    result = rle.decode_classes(rles, H, W, out=out)
    assert result is out and out.shape == (4, H, W)
    for c in range(4):
        np.testing.assert_array_equal(out[c], rle.decode(rles[c], H, W))
    assert out[0].sum() == 0 and out[2].sum() > 0 and out[3].sum() > 0


def test_decode_classes_into_row_major_array_too():
    out = np.full((2, 3, 4), 7, np.uint8)
    rle.decode_classes(["1 2", "12 1"], 3, 4, out=out)
    assert out[0, :2, 0].tolist() == [1, 1] and out[0].sum() == 2
    assert out[1, 2, 3] == 1 and out[1].sum() == 1


def test_decode_classes_names_the_bad_class():
    with pytest.raises(RLEError, match="image x.jpg class 2: odd"):
        rle.decode_classes(["", "1"], 4, 4, image_id="x.jpg")


def test_decode_bits_sets_one_bit_a_class_where_decode_classes_has_its_mask(real_dir):
    strings = {row.ClassId: row.EncodedPixels for row in real_rows(real_dir)}
    rles = [strings.get(c, "") for c in (1, 2, 3, 4)]
    rles[0] = rles[2]  # class 1 where class 3 is: overlapping classes keep both bits
    bits = rle.decode_bits(rles, H, W)
    masks = rle.decode_classes(rles, H, W)
    assert bits.shape == (H, W) and bits.dtype == np.uint8
    for c in range(4):
        np.testing.assert_array_equal((bits >> c) & 1, masks[c])
    # nothing, classes 1 + 3, class 4, and 1 + 3 + 4 where this image's classes 3 and 4 touch
    assert set(np.unique(bits).tolist()) == {0, 5, 8, 13}


def test_decode_bits_names_the_bad_class():
    with pytest.raises(RLEError, match="image x.jpg class 4: odd"):
        rle.decode_bits(["", "", "", "3"], 4, 4, image_id="x.jpg")


def test_overlap_of_touching_runs_by_hand():
    """Pixels 1-2 and 3-4 (touching runs, which encode never writes) against 2-4: 3 shared."""
    a, b = rle.run_lengths("1 2 3 2", 2, 3), rle.run_lengths("2 3", 2, 3)
    assert rle.overlap(a, b) == 3 and rle.overlap(b, a) == 3
    assert rle.overlap(a, rle.run_lengths("", 2, 3)) == 0
    assert rle.overlap(rle.run_lengths("5 2", 2, 3), rle.run_lengths("1 4", 2, 3)) == 0


@settings(max_examples=200, deadline=None)
@given(masks(30, 3))
def test_overlap_of_runs_counts_the_pixels_both_masks_cover(pair):
    """Two masks drawn from one array's bits: any shapes, touching and nested runs."""
    a, b = pair & 1, pair >> 1
    runs_a, runs_b = (rle.run_lengths(rle.encode(m), *m.shape) for m in (a, b))
    assert rle.overlap(runs_a, runs_b) == int((a & b).sum())
    assert rle.overlap(runs_b, runs_a) == int((a & b).sum())
    assert rle.overlap(runs_a, runs_a) == int(a.sum()) == int(runs_a[1::2].sum())
