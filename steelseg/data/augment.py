"""Training augmentation of uint8 batches: a random crop (optionally one that holds defect
pixels), flips and brightness/contrast, the same geometry on image and mask. Free of Ray, so the
benchmarks and a bare GPU machine run the very functions the Ray Data pipeline maps.
"""

import zlib
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np


@lru_cache(maxsize=4)
def augmentation(crop_height: int, crop_width: int, defect_crops: float = 0.0):
    """albumentations' ``Compose``; imported here, where it runs: it imports torch, which the
    Ray Data processes that only plan or read the pipeline need not pay for.

    ``defect_crops``: the share of crops placed on defect pixels when the image has any
    (albumentations' ``CropNonEmptyMaskIfExists``); the rest are uniform. Defects cover a few
    percent of the pixels, so uniform crops of a wide strip often miss them all.
    """
    import albumentations as A

    steps = []
    if crop_height and defect_crops >= 1:
        steps = [A.CropNonEmptyMaskIfExists(crop_height, crop_width)]
    elif crop_height and defect_crops > 0:
        choice = [
            A.CropNonEmptyMaskIfExists(crop_height, crop_width, p=defect_crops),
            A.RandomCrop(crop_height, crop_width, p=1 - defect_crops),
        ]
        steps = [A.OneOf(choice, p=1)]
    elif crop_height:
        steps = [A.RandomCrop(crop_height, crop_width)]
    steps += [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
    ]
    return A.Compose(steps)


def sample_seed(seed: int, epoch: int, sample: int) -> int:
    """The seed of one row's augmentation in one epoch: new crops every epoch, the same in
    every run, attempt and resume with the same seed, whatever batch the row lands in."""
    return zlib.crc32(f"{seed}|{epoch}|{sample}".encode())


def augment_batch(
    batch: Mapping[str, Any],
    crop_height: int,
    crop_width: int,
    seed: int,
    defect_crops: float = 0.0,
    epoch: int = 0,
) -> dict[str, np.ndarray]:
    """Crop, flips and brightness/contrast of ``image`` (B, H, W, C) and ``mask`` (B, H, W),
    stacked or as sequences of arrays of any sizes (only the outputs are stacked), each row
    seeded by ``sample_seed`` (``sample``: the rows' places in the training table,
    passed on, so that a consumer can tell which rows it was given; their order in the batch
    without it)."""
    compose = augmentation(crop_height, crop_width, defect_crops)
    samples = batch.get("sample", range(len(batch["image"])))
    out = []
    for image, mask, sample in zip(batch["image"], batch["mask"], samples):
        compose.set_random_seed(sample_seed(seed, epoch, int(sample)))
        out.append(compose(image=image, mask=mask))
    augmented = {
        "image": np.stack([o["image"] for o in out]),
        "mask": np.stack([o["mask"] for o in out]),
    }
    if "sample" in batch:
        augmented["sample"] = np.asarray(batch["sample"])
    return augmented
