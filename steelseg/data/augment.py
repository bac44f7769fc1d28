"""Training augmentation of uint8 batches: a random crop (optionally one that holds defect
pixels), flips and brightness/contrast, the same geometry on image and mask. Free of Ray, so the
benchmarks and a bare GPU machine run the very functions the Ray Data pipeline maps.
"""

import zlib
from functools import lru_cache

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


def batch_seed(seed: int, image_ids: np.ndarray) -> int:
    """Depends on the batch's images, which the per-epoch shuffle changes: new augmentations
    every epoch, the same ones in every run with the same seed."""
    return zlib.crc32(("|".join(map(str, image_ids)) + f"|{seed}").encode())


def augment_batch(
    batch: dict[str, np.ndarray],
    crop_height: int,
    crop_width: int,
    seed: int,
    defect_crops: float = 0.0,
) -> dict[str, np.ndarray]:
    """Crop, flips and brightness/contrast of ``image`` (B, H, W, C) and ``mask`` (B, H, W)."""
    compose = augmentation(crop_height, crop_width, defect_crops)
    compose.set_random_seed(batch_seed(seed, batch["image_id"]))
    out = [compose(image=img, mask=msk) for img, msk in zip(batch["image"], batch["mask"])]
    return {
        "image": np.stack([o["image"] for o in out]),
        "mask": np.stack([o["mask"] for o in out]),
    }
