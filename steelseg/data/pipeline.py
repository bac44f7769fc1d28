"""Ray Data pipelines from the catalog table to the Train workers.

Rows hold paths and RLE strings; ``map_batches`` reads the JPEGs and decodes the masks into
uint8 NumPy batches (``image`` (B, H, W, C), ``mask`` (B, H, W) with bit c set for class c + 1,
so all four classes cost one byte a pixel in the object store); the training set is then
augmented with albumentations. Floats appear only on the worker (``steelseg.model.inputs``).

Shuffling happens on the table, before decoding, with a seed that changes every epoch but is
the same in every run, so each epoch sees new batches and new augmentations, repeatably. The
table (paths and RLE strings, small) is shuffled as one block and then cut into the blocks that
tasks decode: Ray's shuffle of n blocks makes n x n objects, which cost 0.1 s a block per epoch
before any image was read (benchmarks/bench_pipeline.py).
"""

import numpy as np
import pandas as pd
import ray
import ray.data

from steelseg.config import TrainConfig
from steelseg.data import rle
from steelseg.data.augment import augment_batch
from steelseg.data.images import path_columns, read_stack
from steelseg.domain import RLE_COLUMNS
from steelseg.errors import SteelsegError

# a task decodes about this many pixels (48 MB of RGB): its work outweighs its start
BLOCK_PIXELS = 2**24
MIN_ROWS_PER_BLOCK, MAX_ROWS_PER_BLOCK = 8, 256


def read_batch(batch: dict[str, np.ndarray], modalities: list[str]) -> dict[str, np.ndarray]:
    """Catalog rows -> uint8 ``image`` (B, H, W, C) and ``mask`` (B, H, W) class bits."""
    columns = path_columns(modalities)
    images, masks = [], []
    for i, image_id in enumerate(batch["image_id"]):
        image = read_stack([batch[c][i] for c in columns])
        height, width = image.shape[:2]
        strings = [batch[c][i] for c in RLE_COLUMNS]
        images.append(image)
        masks.append(rle.decode_bits(strings, height, width, image_id=image_id))
    return {"image": np.stack(images), "mask": np.stack(masks), "image_id": batch["image_id"]}


def rows_per_block(table: pd.DataFrame) -> int:
    """Images a Ray Data task decodes: about ``BLOCK_PIXELS``, between 8 and 256 images."""
    pixels = int(table["height"].max()) * int(table["width"].max())
    return int(np.clip(BLOCK_PIXELS // pixels, MIN_ROWS_PER_BLOCK, MAX_ROWS_PER_BLOCK))


def n_blocks(table: pd.DataFrame) -> int:
    return max(1, -(-len(table) // rows_per_block(table)))


def _columns(table: pd.DataFrame, modalities: list[str]) -> pd.DataFrame:
    return table[["image_id", *path_columns(modalities), *RLE_COLUMNS]].reset_index(drop=True)


def _from_table(table: pd.DataFrame, modalities: list[str]) -> ray.data.Dataset:
    n = n_blocks(table)
    rows = _columns(table, modalities)
    return ray.data.from_pandas([rows.iloc[i::n].reset_index(drop=True) for i in range(n)])


def check_crop(config: TrainConfig, table: pd.DataFrame) -> None:
    height, width = int(table["height"].min()), int(table["width"].min())
    if config.crop_height > height or config.crop_width > width:
        raise SteelsegError(
            f"config crop {config.crop_height}x{config.crop_width} is larger than the images "
            f"({height}x{width})"
        )


def train_dataset(table: pd.DataFrame, config: TrainConfig) -> ray.data.Dataset:
    check_crop(config, table)
    shuffle_seed = ray.data.RandomSeedConfig(seed=config.seed, reseed_after_execution=True)
    return (
        ray.data.from_pandas(_columns(table, config.modalities))
        .random_shuffle(seed=shuffle_seed)
        .repartition(n_blocks(table))
        .map_batches(read_batch, fn_kwargs={"modalities": config.modalities}, batch_size=8)
        .map_batches(
            augment_batch,
            fn_kwargs={
                "crop_height": config.crop_height,
                "crop_width": config.crop_width,
                "seed": config.seed,
                "defect_crops": config.defect_crops,
            },
            batch_size=8,
        )
    )


def val_dataset(table: pd.DataFrame, config: TrainConfig) -> ray.data.Dataset:
    """Whole images, nothing random."""
    return (
        _from_table(table, config.modalities)
        .map_batches(read_batch, fn_kwargs={"modalities": config.modalities}, batch_size=8)
        .drop_columns(["image_id"])
    )
