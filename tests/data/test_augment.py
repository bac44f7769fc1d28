"""Training augmentation: seeding, and crops placed on defects."""

import numpy as np
import pytest

from steelseg.data import augment


def augmented(seed, epoch, samples):
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 255, (4, 64, 96, 3), dtype=np.uint8),
        "mask": rng.integers(0, 16, (4, 64, 96), dtype=np.uint8),
        "sample": np.array(samples),
    }
    return augment.augment_batch(batch, 32, 64, seed, epoch=epoch)


def test_a_rows_augmentation_is_its_seeds_epochs_and_places_whatever_its_batch():
    first, again = augmented(0, 3, [0, 1, 2, 3]), augmented(0, 3, [0, 1, 2, 3])
    assert first["image"].shape == (4, 32, 64, 3) and first["mask"].shape == (4, 32, 64)
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["mask"], again["mask"])
    for changed in (augmented(1, 3, [0, 1, 2, 3]), augmented(0, 4, [0, 1, 2, 3])):
        assert not np.array_equal(first["image"], changed["image"])  # another seed or epoch
    # each row alone, in a batch of its own, is cropped and flipped as in the batch: a resumed
    # run's batches, cut otherwise, augment every row as the uninterrupted run did
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 64, 96, 3), dtype=np.uint8)
    masks = rng.integers(0, 16, (4, 64, 96), dtype=np.uint8)
    for i in range(4):
        alone = {"image": images[i : i + 1], "mask": masks[i : i + 1], "sample": np.array([i])}
        out = augment.augment_batch(alone, 32, 64, 0, epoch=3)
        np.testing.assert_array_equal(out["image"][0], first["image"][i])


def one_small_defect(n: int) -> dict[str, np.ndarray]:
    """Wide images with one 8x8 defect of class 3 near the right end, and one clean image."""
    mask = np.zeros((n, 32, 320), np.uint8)
    mask[:-1, 12:20, 290:298] = 1 << 2
    image = np.full((n, 32, 320, 3), 128, np.uint8)
    return {"image": image, "mask": mask, "image_id": np.arange(n)}


# uniform crops of width 64 cover the 8-wide defect in 1 of about 8 places: 63 / 8 = 8 expected,
# 3..16 (binomial, within 2.5 standard deviations); half on defects: 31.5 + 3.9 = 35 expected
@pytest.mark.parametrize("share, low, high", [(0.0, 3, 16), (0.5, 26, 45), (1.0, 63, 63)])
def test_defect_crops_hold_defect_pixels_as_often_as_asked(share, low, high):
    batch = one_small_defect(64)
    out = augment.augment_batch(batch, 32, 64, seed=3, defect_crops=share)
    assert out["image"].shape == (64, 32, 64, 3)
    with_defect = int((out["mask"][:-1] == 1 << 2).any(axis=(1, 2)).sum())
    # uniform crops of width 64 cover the defect in 1 of about 8 places; the clean image never
    assert low <= with_defect <= high
    assert not out["mask"][-1].any()
