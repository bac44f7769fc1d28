"""The data pipelines from the catalog table to a Train worker: a rank's training batches of a
whole run from one Ray Data dataset, its validation batches read in the worker.

A training dataset's rows hold an epoch and a place in the run's table of paths and RLE
strings, which the object store holds once. ``map_batches`` reads the JPEGs and decodes the
masks into
uint8 NumPy batches (``image`` (B, H, W, C), ``mask`` (B, H, W) with bit c set for class c + 1,
so all four classes cost one byte a pixel in the object store); the training set is then
augmented with albumentations. Floats appear only on the worker (``steelseg.model.inputs``).

What a rank reads is a function of the seed, the epoch, its rank and the world size alone
(``train_samples``, ``val_rows``): each epoch the small table of paths is permuted by an
epoch-seeded generator and cut into equal shares, one a rank (DDP steps together; the few rows
left over wait for another epoch), and every crop and flip is seeded by the seed, the epoch and
the row. So a run stopped and resumed at epoch k reads at epoch k exactly what the
uninterrupted run read, and no epoch costs an all-to-all shuffle of blocks before its first
image. Validation gives every image to one rank (``val_rows``): the counts are summed across
ranks afterwards, so the shares need not be equal.

How the work is cut (``Blocks``; docs/performance.md, Data pipeline, has the measurements): a
Ray Data task costs a tenth of a second or more beyond its work (its dispatch, and the executor
noticing its end, which it checks at most every 0.1 s while another task runs), so a task reads
seconds of images, and an epoch has a task for each of a rank's CPUs unless that would make
tasks under a quarter of that size. A rank reads all its
training epochs from one dataset, so an epoch's end leaves no core idle (the next epoch's tasks
are already running) and the executor's start, about a second of one task before it uses its
CPUs, comes once a run. A training task reads and augments each image in one function
(``train_batch``), and emits each part it augments as a block of its own of about
``BLOCK_BYTES``, a whole number of training batches: a block of one chunk, which the consumer
slices into batches without copying, where several batches of a block would be concatenated
first.
"""

import concurrent.futures
import contextlib
import hashlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import ray
import ray.data
import torch

from steelseg.config import TrainConfig
from steelseg.data import augment, rle
from steelseg.data.augment import augment_batch
from steelseg.data.images import in_channels, path_columns, read_stack
from steelseg.domain import RLE_COLUMNS
from steelseg.errors import SteelsegError

# a task reads about this many pixels: 1,310 images at 256x1600, 3.5 s of decoding on one core
TASK_PIXELS = 2**29
MAX_ROWS_PER_TASK = 4096
# at least, an epoch's, as long as no task falls under a quarter of TASK_PIXELS
TASKS_PER_CPU = 1
BLOCK_BYTES = 2**25  # what a block carries at most (32 MiB: 80 grey 256x800 crops and masks)


def read_rows(
    batch: dict[str, np.ndarray], modalities: list[str], grey: bool = False
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Catalog rows -> each row's uint8 image (H, W, C) and mask (H, W) of class bits; with
    ``grey`` the visible image is one channel (``images.read_stack``)."""
    columns = path_columns(modalities)
    images, masks = [], []
    for i, image_id in enumerate(batch["image_id"]):
        image = read_stack([batch[c][i] for c in columns], grey)
        height, width = image.shape[:2]
        strings = [batch[c][i] for c in RLE_COLUMNS]
        images.append(image)
        masks.append(rle.decode_bits(strings, height, width, image_id=image_id))
    return images, masks


def read_batch(
    batch: dict[str, np.ndarray], modalities: list[str], grey: bool = False
) -> dict[str, np.ndarray]:
    """Catalog rows -> uint8 ``image`` (B, H, W, C) and ``mask`` (B, H, W) class bits
    (``read_rows``), whole images, as validation reads them."""
    images, masks = read_rows(batch, modalities, grey)
    out = {"image": np.stack(images), "mask": np.stack(masks), "image_id": batch["image_id"]}
    if "sample" in batch:
        out["sample"] = batch["sample"]
    return out


def train_batch(
    batch: dict[str, np.ndarray],
    modalities: list[str],
    grey: bool,
    crop_height: int,
    crop_width: int,
    seed: int,
    epoch: int,
    defect_crops: float = 0.0,
) -> dict[str, np.ndarray]:
    """Catalog rows -> augmented uint8 ``image``, ``mask`` and ``sample`` (``read_rows`` then
    ``augment.augment_batch``): each image is cropped as it is read, and only the crops are
    stacked."""
    images, masks = read_rows(batch, modalities, grey)
    rows = {"image": images, "mask": masks, "sample": batch["sample"]}
    return augment_batch(rows, crop_height, crop_width, seed, defect_crops, epoch)


class Blocks(NamedTuple):
    """How an epoch's rows are cut: ``task`` rows a Ray Data task reads, ``block`` rows a block
    (one part a task augments and emits) carries, and ``block_bytes`` the bytes of a full
    block."""

    task: int
    block: int
    block_bytes: int


def blocks(rows: int, pixels: int, row_bytes: int, batch_size: int, cpus: int = 1) -> Blocks:
    """The cut of ``rows`` images of ``pixels`` each into tasks and blocks, when a row ends as
    ``row_bytes`` in a block and the consumer takes batches of ``batch_size``.

    A task reads about ``TASK_PIXELS``; an epoch has at least ``TASKS_PER_CPU`` tasks for each
    of ``cpus``, as long as no task falls under a quarter of ``TASK_PIXELS`` (a task costs Ray
    Data a tenth of a second or more beyond its work). Tasks are of equal size (the last one
    the rest), in whole batches, and a block is an equal share of its task of at most
    ``BLOCK_BYTES``, in whole batches (at least one batch).
    """
    longest = int(np.clip(TASK_PIXELS // pixels, 1, MAX_ROWS_PER_TASK))
    shortest = max(1, longest // 4)
    wanted = min(TASKS_PER_CPU * max(1, cpus), -(-rows // shortest))
    tasks = max(1, -(-rows // longest), wanted)
    task = -(-max(1, rows) // tasks)
    task = -(-task // batch_size) * batch_size  # whole batches
    largest = max(1, BLOCK_BYTES // (row_bytes * batch_size)) * batch_size
    shares = -(-task // largest)
    block = -(-task // (shares * batch_size)) * batch_size
    return Blocks(shares * block, block, block * row_bytes)


def _channels(config: TrainConfig, grey: bool) -> int:
    """A block's bytes per pixel: the image's channels (a grey visible image is one, each
    other modality one) and the mask's byte."""
    return (len(config.modalities) if grey else in_channels(config.modalities)) + 1


def _size(table: pd.DataFrame) -> tuple[int, int]:
    """The largest height and width in ``table`` (1, 1 for no rows)."""
    if table.empty:
        return 1, 1
    return int(table["height"].max()), int(table["width"].max())


def train_blocks(table: pd.DataFrame, config: TrainConfig, grey: bool, cpus: int) -> Blocks:
    height, width = _size(table)
    out = config.crop_height * config.crop_width or height * width
    row_bytes = out * _channels(config, grey)
    return blocks(len(table), height * width, row_bytes, config.batch_size, cpus)


def _columns(table: pd.DataFrame, modalities: list[str]) -> pd.DataFrame:
    return table[["image_id", *path_columns(modalities), *RLE_COLUMNS]].reset_index(drop=True)


@contextlib.contextmanager
def _block_per_batch(cut: Blocks) -> Iterator[None]:
    """Datasets made inside emit each batch a ``map_batches`` function returns or yields as a
    block of its own: Ray Data ends a block once it holds more than ``target_max_block_size``
    bytes, and slices one only past 1.5 times that, so a target of 3/4 of a full block's bytes
    does neither early (a dataset takes the context as it is when made)."""
    context = ray.data.DataContext.get_current()
    kept = context.target_max_block_size
    context.target_max_block_size = max(1, cut.block_bytes * 3 // 4)
    try:
        yield
    finally:
        context.target_max_block_size = kept


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of ``n`` training rows in ``epoch`` (0-based): the same for every rank, every
    attempt and every resume."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def train_samples(n: int, seed: int, epoch: int, rank: int, world: int) -> np.ndarray:
    """The places in a training table of ``n`` rows of the rows ``rank`` of ``world`` reads in
    ``epoch``, in order: an equal share of the epoch's order (``n // world`` rows)."""
    share = n // world
    return epoch_order(n, seed, epoch)[rank * share : (rank + 1) * share]


def train_rows(table: pd.DataFrame, seed: int, epoch: int, rank: int, world: int) -> pd.DataFrame:
    """The training rows ``rank`` of ``world`` reads in ``epoch``, in order
    (``train_samples``), indexed by their places in the table."""
    samples = train_samples(len(table), seed, epoch, rank, world)
    return table.reset_index(drop=True).iloc[samples]


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


# the training tables this process's tasks were given, by their contents' hash: fetched once
_TABLES: dict[str, pd.DataFrame] = {}


class Table(NamedTuple):
    """A table in the object store and the hash of its contents: the ranks of a run each put
    the same table, and a process that reads for several of them fetches it once."""

    key: str
    ref: ray.ObjectRef


def _shared(table: pd.DataFrame) -> Table:
    digest = hashlib.sha1(pd.util.hash_pandas_object(table).to_numpy().tobytes()).hexdigest()
    return Table(f"{digest}-{len(table)}-{'-'.join(table.columns)}", ray.put(table))


def _table(table: Table) -> pd.DataFrame:
    """The table behind ``table``, fetched once a process."""
    if table.key not in _TABLES:
        if len(_TABLES) >= 4:  # runs come and go in a long-lived Ray worker process
            _TABLES.clear()
        _TABLES[table.key] = ray.get(table.ref)
    return _TABLES[table.key]


def train_task(
    rows: dict[str, np.ndarray],
    table: Table,
    block: int,
    modalities: list[str],
    grey: bool,
    crop_height: int,
    crop_width: int,
    seed: int,
    defect_crops: float = 0.0,
) -> Iterator[dict[str, np.ndarray]]:
    """A task's rows (``epoch``, and ``sample``, a row's place in the run's ``table``), all of
    one epoch, -> its blocks of ``block`` rows (``train_batch``), each marked with the epoch."""
    if not len(rows["epoch"]):
        return
    epoch = int(rows["epoch"][0])
    if (rows["epoch"] != epoch).any():
        raise ValueError(f"a training task's rows span epochs {sorted(set(rows['epoch']))}")
    paths = _table(table)
    for start in range(0, len(rows["epoch"]), block):
        samples = rows["sample"][start : start + block]
        part = {c: paths[c].to_numpy()[samples] for c in paths.columns}
        out = train_batch(
            {**part, "sample": samples},
            modalities,
            grey,
            crop_height,
            crop_width,
            seed,
            epoch,
            defect_crops,
        )
        out["epoch"] = np.full(len(samples), epoch)
        yield out


def train_dataset(
    table: pd.DataFrame,
    epochs: Mapping[int, np.ndarray],
    config: TrainConfig,
    grey: bool = False,
    cpus: int = 1,
) -> ray.data.Dataset:
    """A rank's augmented training blocks of every epoch in ``epochs`` (epoch -> the places in
    ``table`` of the rows it reads, in order: ``train_samples``), in the order of the run, as
    one dataset: one Ray Data executor for the run, since a new one runs one task for about a
    second before it uses its CPUs, and it reads the next epoch's first images while the loop
    validates. The table of paths and RLE strings is put in the object store once and fetched
    once by each process that reads it; the dataset's own rows are an epoch and a place each.
    A task and a block hold one epoch's rows (column ``epoch``), whole batches but for an
    epoch's last block, cut for the ``cpus`` Ray Data has for the rank (``train_blocks`` of the
    longest epoch); ``epoch_batches`` takes an epoch's batches from them."""
    if not epochs:
        raise ValueError("a training dataset of no epochs")
    table = table.reset_index(drop=True)
    longest = max(epochs.values(), key=len)
    cut = train_blocks(table.iloc[longest], config, grey, cpus)
    frames = [
        pd.DataFrame({"epoch": np.full(len(part), epoch), "sample": part})
        for epoch, samples in epochs.items()
        for part in np.split(np.asarray(samples), range(cut.task, len(samples), cut.task))
        if len(part)
    ]
    if not frames:  # a rank with no rows
        frames = [pd.DataFrame({"epoch": np.zeros(0, int), "sample": np.zeros(0, int)})]
    augment = {
        "table": _shared(_columns(table, config.modalities)),
        "block": cut.block,
        "modalities": config.modalities,
        "grey": grey,
        "crop_height": config.crop_height,
        "crop_width": config.crop_width,
        "seed": config.seed,
        "defect_crops": config.defect_crops,
    }
    with _block_per_batch(cut):
        # batch_size=None: a task takes one chunk as it is (one epoch's rows), never bundling
        # the end of an epoch with the start of the next; the ignore: Ray's map_batches
        # annotation wants a function of the batch alone, leaving out fn_kwargs
        return ray.data.from_pandas(frames).map_batches(
            train_task,  # type: ignore[arg-type]
            fn_kwargs=augment,
            batch_size=None,
        )


def epoch_batches(
    blocks: Iterator[dict[str, Any]], rows: int, batch_size: int, epoch: int
) -> Iterator[dict[str, Any]]:
    """``epoch``'s ``rows`` in batches of ``batch_size`` (the last one the rest), sliced without
    copying from the next blocks of a run's ``train_dataset`` (``iter_torch_batches`` with
    ``batch_size=None``), leaving the next epoch's blocks in ``blocks``. A block of another
    epoch, or one that is not whole batches but the epoch's last, is an error, not a short
    batch."""
    left = rows
    while left > 0:
        block = next(blocks, None)
        if block is None:
            raise RuntimeError(f"the training data ended {left} rows before epoch {epoch}'s end")
        n = len(block.get("epoch", ()))
        if n == 0:  # a task that read no rows
            continue
        got = int(block["epoch"][0])
        if got != epoch or n > left or (n % batch_size and n != left):
            raise RuntimeError(
                f"a block of {n} rows of epoch {got} where epoch {epoch} has {left} rows left"
                f" in batches of {batch_size}"
            )
        for start in range(0, n, batch_size):
            yield {k: v[start : start + batch_size] for k, v in block.items() if k != "epoch"}
        left -= n


def val_batches(
    rows: pd.DataFrame, config: TrainConfig, grey: bool = False, pin: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """A rank's validation batches from its ``val_rows`` (``read_batch``: whole images, nothing
    random), read in this process, a thread reading the next batch while the caller uses one
    (``pin``: into pinned memory, for a copy to the GPU that overlaps compute).
    Not through Ray Data: the run's training dataset goes on decoding the next epoch while the
    loop validates, and once its output fills its object-store budget its tasks wait holding
    their CPUs, where a validation dataset's tasks would wait for them in turn."""
    table = _columns(rows, config.modalities)
    parts = [table.iloc[a : a + config.batch_size] for a in range(0, len(table), config.batch_size)]

    def read(part: pd.DataFrame) -> dict[str, torch.Tensor]:
        batch = read_batch({c: part[c].to_numpy() for c in part.columns}, config.modalities, grey)
        tensors = {k: torch.from_numpy(batch[k]) for k in ("image", "mask")}
        return {k: v.pin_memory() for k, v in tensors.items()} if pin else tensors

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        ahead = pool.submit(read, parts[0]) if parts else None
        for following in [*parts[1:], None]:
            batch = ahead.result() if ahead else None
            ahead = pool.submit(read, following) if following is not None else None
            if batch is not None:
                yield batch
    finally:  # a caller that stops early does not wait for the batch being read
        pool.shutdown(wait=False, cancel_futures=True)
