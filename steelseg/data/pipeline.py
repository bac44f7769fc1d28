"""Ray Data pipelines from the catalog table to a Train worker, one per rank and epoch.

Rows hold paths and RLE strings; ``map_batches`` reads the JPEGs and decodes the masks into
uint8 NumPy batches (``image`` (B, H, W, C), ``mask`` (B, H, W) with bit c set for class c + 1,
so all four classes cost one byte a pixel in the object store); the training set is then
augmented with albumentations. Floats appear only on the worker (``steelseg.model.inputs``).

What a rank reads is a function of the seed, the epoch, its rank and the world size alone
(``train_rows``, ``val_rows``): each epoch the small table of paths is permuted by an
epoch-seeded generator and cut into equal shares, one a rank (DDP steps together; the few rows
left over wait for another epoch), and every crop and flip is seeded by the seed, the epoch and
the row. So a run stopped and resumed at epoch k reads at epoch k exactly what the
uninterrupted run read, and no epoch costs an all-to-all shuffle of blocks before its first
image. Validation gives every image to one rank (``val_rows``): the counts are summed across
ranks afterwards, so the shares need not be equal.
"""

import itertools

import numpy as np
import pandas as pd
import ray
import ray.data

from steelseg.config import TrainConfig
from steelseg.data import augment, rle
from steelseg.data.augment import augment_batch
from steelseg.data.images import path_columns, read_stack
from steelseg.domain import RLE_COLUMNS
from steelseg.errors import SteelsegError

# a task decodes about this many pixels (48 MB of RGB): its work outweighs its start
BLOCK_PIXELS = 2**24
MIN_ROWS_PER_BLOCK, MAX_ROWS_PER_BLOCK = 8, 256


def read_batch(
    batch: dict[str, np.ndarray], modalities: list[str], grey: bool = False
) -> dict[str, np.ndarray]:
    """Catalog rows -> uint8 ``image`` (B, H, W, C) and ``mask`` (B, H, W) class bits; with
    ``grey`` the visible image is one channel (``images.read_stack``)."""
    columns = path_columns(modalities)
    images, masks = [], []
    for i, image_id in enumerate(batch["image_id"]):
        image = read_stack([batch[c][i] for c in columns], grey)
        height, width = image.shape[:2]
        strings = [batch[c][i] for c in RLE_COLUMNS]
        images.append(image)
        masks.append(rle.decode_bits(strings, height, width, image_id=image_id))
    out = {"image": np.stack(images), "mask": np.stack(masks), "image_id": batch["image_id"]}
    if "sample" in batch:
        out["sample"] = batch["sample"]
    return out


def rows_per_block(table: pd.DataFrame) -> int:
    """Images a Ray Data task decodes: about ``BLOCK_PIXELS``, between 8 and 256 images."""
    pixels = int(table["height"].max()) * int(table["width"].max())
    return int(np.clip(BLOCK_PIXELS // pixels, MIN_ROWS_PER_BLOCK, MAX_ROWS_PER_BLOCK))


def n_blocks(table: pd.DataFrame) -> int:
    return max(1, -(-len(table) // rows_per_block(table)))


def _columns(table: pd.DataFrame, modalities: list[str]) -> pd.DataFrame:
    return table[["image_id", *path_columns(modalities), *RLE_COLUMNS]].reset_index(drop=True)


def _from_table(table: pd.DataFrame, modalities: list[str]) -> ray.data.Dataset:
    """The rows in order, in blocks of about ``BLOCK_PIXELS``."""
    rows = _columns(table, modalities)
    rows["sample"] = table.index.to_numpy()  # the row's place in the table: seeds its crops
    bounds = np.linspace(0, len(rows), n_blocks(table) + 1).astype(int)
    return ray.data.from_pandas([rows.iloc[a:b] for a, b in itertools.pairwise(bounds)])


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``n`` training rows in ``epoch`` (0-based): the same for every rank, every
    attempt and every resume."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_rows(table: pd.DataFrame, seed: int, epoch: int, rank: int, world: int) -> pd.DataFrame:
    """The training rows ``rank`` of ``world`` reads in ``epoch``, in order: an equal share of
    the epoch's order (``len(table) // world`` rows)."""
    share = len(table) // world
    order = epoch_order(len(table), seed, epoch)[rank * share : (rank + 1) * share]
    return table.reset_index(drop=True).iloc[order]


def val_rows(table: pd.DataFrame, rank: int, world: int) -> pd.DataFrame:
    """The validation rows of ``rank``: every ``world``-th row, so that the ranks together
    validate every image once."""
    return table.reset_index(drop=True).iloc[rank::world]


def check_crop(config: TrainConfig, table: pd.DataFrame) -> None:
    height, width = int(table["height"].min()), int(table["width"].min())
    if config.crop_height > height or config.crop_width > width:
        raise SteelsegError(
            f"config crop {config.crop_height}x{config.crop_width} is larger than the images "
            f"({height}x{width})"
        )


def _warm(crop_height: int, crop_width: int, defect_crops: float) -> int:
    """Import what a training task runs (albumentations imports torch: seconds) and build its
    augmentation, in this Ray worker process."""
    import os

    augment.augmentation(crop_height, crop_width, defect_crops)
    return os.getpid()


def warm_up(config: TrainConfig, processes: int) -> list[ray.ObjectRef]:
    """Start ``processes`` tasks that import the pipeline's modules into Ray's idle worker
    processes, where the first epoch's decode tasks run next, so that those imports overlap the
    caller's own set-up (a Train worker building its model) rather than delay the first batch.
    Returns their refs; nothing need wait for them."""
    task = ray.remote(num_cpus=1)(_warm)
    args = (config.crop_height, config.crop_width, config.defect_crops)
    return [task.remote(*args) for _ in range(max(1, processes))]


def ordered_context() -> None:
    """Ray Data in this process keeps the rows in their order (the epoch's, seeded) and draws
    no progress bars (a Train worker's output is not the user's console)."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False


def train_dataset(
    rows: pd.DataFrame, config: TrainConfig, epoch: int, grey: bool = False
) -> ray.data.Dataset:
    """A rank's training batches of ``epoch`` from its ``train_rows``: read (``read_batch``),
    then augmented."""
    read = {"modalities": config.modalities, "grey": grey}
    # the ignores: Ray's map_batches annotation wants a function of the batch alone, leaving out
    # fn_kwargs
    return (
        _from_table(rows, config.modalities)
        .map_batches(read_batch, fn_kwargs=read, batch_size=8)  # type: ignore[arg-type]
        .map_batches(
            augment_batch,  # type: ignore[arg-type]
            fn_kwargs={
                "crop_height": config.crop_height,
                "crop_width": config.crop_width,
                "seed": config.seed,
                "epoch": epoch,
                "defect_crops": config.defect_crops,
            },
            batch_size=8,
        )
    )


def val_dataset(rows: pd.DataFrame, config: TrainConfig, grey: bool = False) -> ray.data.Dataset:
    """A rank's validation batches from its ``val_rows``: whole images, nothing random."""
    read = {"modalities": config.modalities, "grey": grey}
    return (
        _from_table(rows, config.modalities)
        .map_batches(read_batch, fn_kwargs=read, batch_size=8)  # type: ignore[arg-type]
        .drop_columns(["image_id", "sample"])
    )
