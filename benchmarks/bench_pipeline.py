"""The training data pipeline: images/s delivered to the training loop by Ray Data and by a plain
``torch.utils.data.DataLoader`` doing the same work with the same number of CPU processes.

    python benchmarks/bench_pipeline.py      # 32x160, 64x320, 256x1600 (crop 256x800)
    python benchmarks/bench_pipeline.py --sizes 256x1600 --processes 1,2,4 --data /data/severstal
    python benchmarks/bench_pipeline.py --sizes 64x320,256x1600 --processes 2 --channels grey,rgb

The work per batch is the same code in both: ``steelseg.data.pipeline.train_batch`` (JPEG decode,
RLE decode of the 4 classes to class bits, then ``augment_batch``: random crop, flips,
brightness/contrast, seeded per epoch and row) on each epoch's rows (``pipeline.train_rows``),
ending as uint8 torch tensors in batches of ``--batch`` in the consuming process, which does
nothing else (the GPU's step is not simulated). Ray runs with ``num_cpus`` = processes and the
consumer iterates ``iter_torch_batches`` over one ``pipeline.train_dataset`` of all the epochs
(cut for that many CPUs) and takes each epoch's batches with ``pipeline.epoch_batches``, as a
Train worker does; the DataLoader runs ``num_workers`` =
processes, persistent, with ``batch_size=None`` over the same rows in batches. The first epoch
includes starting the processes; the figure compared is the best later epoch. Every epoch of both
is checked to deliver every row of the epoch exactly once.

An epoch is by default as long as a rank's share of the real data set on 3 ranks at 256x1600
(4,000 images; at other sizes, as many pixels); ``--images`` sets another length.

``--channels``: ``grey`` reads the visible image as one channel (what training does on a data
set of grey images, such as Severstal's), ``rgb`` as three; ``bytes_per_image`` is what a batch
carries through the object store per image. The targets (Ray Data at least 0.9x the DataLoader
after the first epoch; its first epoch within 1.5x of its later ones) are printed with the
figures.

It also times each part of the work in this process, one image at a time, and from the
per-process rate at 256x1600 states how many CPU cores feed one GPU's training step.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import record, start_ray_data_actors, table

from steelseg.config import TrainConfig
from steelseg.data import augment, catalog, pipeline, rle, synth
from steelseg.data.images import path_columns, read_stack
from steelseg.domain import RLE_COLUMNS

# crops as the recipe (docs/training.md) trains at each size: whole small images, 256x800 of the
# real size
CROPS = {(256, 1600): (256, 800)}
# H100, bf16 + channels_last, batch 8 (docs/performance.md, Training step): 138 images/s on
# whole 256x1600 images; a 256x800 crop is half the pixels and the step is linear in them, so
# about 2 x 138
# an epoch's pixels by default: a rank's share of the real data set on 3 ranks at 256x1600
EPOCH_PIXELS, MAX_IMAGES = 4000 * 256 * 1600, 20_000
GPU_STEP_IMAGES_PER_S = {"256x1600": 138.0, "256x800": 276.0}


class CatalogBatches(torch.utils.data.Dataset):
    """The DataLoader's side: a batch of an epoch's rows per index list, through the pipeline's
    functions, seeded as the pipeline seeds them."""

    def __init__(self, rows, config: TrainConfig, grey: bool):
        columns = ["image_id", *path_columns(config.modalities), *RLE_COLUMNS]
        self.columns = {c: rows[c].to_numpy() for c in columns}
        self.columns["sample"] = rows.index.to_numpy()
        self.config, self.grey = config, grey

    def __len__(self) -> int:
        return len(self.columns["image_id"])

    def __getitem__(self, item: tuple[int, list[int]]) -> dict[str, torch.Tensor]:
        epoch, indices = item
        config = self.config
        rows = {c: values[indices] for c, values in self.columns.items()}
        out = pipeline.train_batch(
            rows, config.modalities, self.grey, config.crop_height, config.crop_width,
            config.seed, epoch, config.defect_crops,
        )  # fmt: skip
        return {k: torch.from_numpy(v) for k, v in out.items()}


class EpochBatches(torch.utils.data.Sampler):
    """(epoch, row indices) of each batch of the epoch set last, in ``train_rows``'s order."""

    def __init__(self, rows, config: TrainConfig):
        self.rows, self.config, self.epoch = rows, config, 0

    def __iter__(self):
        order = pipeline.epoch_order(len(self.rows), self.config.seed, self.epoch)
        size = self.config.batch_size
        for i in range(0, len(order), size):
            yield self.epoch, order[i : i + size].tolist()

    def __len__(self) -> int:
        return -(-len(self.rows) // self.config.batch_size)


def consume(batches, expected: int) -> tuple[int, float, int]:
    """(images, seconds) to take every batch, and the bytes a batch carries per image; fails
    unless every one of the ``expected`` rows came exactly once."""
    start, n, seen, nbytes = time.perf_counter(), 0, [], 0
    for batch in batches:
        n += batch["image"].shape[0]
        seen.append(batch["sample"].numpy())
        nbytes += batch["image"].nbytes + batch["mask"].nbytes
    seconds = time.perf_counter() - start
    seen = np.concatenate(seen)
    if len(seen) != expected or len(np.unique(seen)) != expected:
        raise AssertionError(f"{len(np.unique(seen))} distinct rows of {len(seen)}, not {expected}")
    return n, seconds, nbytes // n


def with_dataloader(rows, config, processes: int, epochs: int, grey: bool) -> list[float]:
    rows = rows.reset_index(drop=True)
    sampler = EpochBatches(rows, config)
    loader = torch.utils.data.DataLoader(
        CatalogBatches(rows, config, grey),
        sampler=sampler,
        batch_size=None,
        num_workers=processes,
        persistent_workers=True,
        prefetch_factor=2,
    )
    rates = []
    for epoch in range(epochs):
        sampler.epoch = epoch
        n, seconds, _ = consume(loader, len(rows))
        rates.append(n / seconds)
    del loader
    return rates


def with_ray(
    rows, config, processes: int, epochs: int, grey: bool, allocator: bool = True, warm=True
) -> tuple[list[float], int, str, float]:
    """Rates of each epoch, bytes per image, the last epoch's Ray Data stats and the seconds of
    the warm-up (``warm``: ``pipeline.warm_up``, as a Train worker starts it while it builds its
    model, and Ray Data's coordinator, which Ray Train's controller starts before its workers).
    ``allocator=False`` turns off Ray Data's per-operator resource reservation (a kill-switch
    Ray marks for removal; measured, not used by steelseg)."""
    import ray

    ray.init(num_cpus=processes, include_dashboard=False, log_to_driver=False)
    try:
        context = ray.data.DataContext.get_current()
        context.op_resource_reservation_enabled = allocator
        pipeline.ordered_context()  # as a Train worker reads: one rank, its epoch's rows in order
        started = time.perf_counter()
        if warm:  # as a Train run has them before its first batch
            ray.get(pipeline.warm_up(config, processes))
            start_ray_data_actors()
        warm_s = time.perf_counter() - started
        rates = []
        run = {e: pipeline.train_samples(len(rows), config.seed, e, 0, 1) for e in range(epochs)}
        dataset = pipeline.train_dataset(rows, run, config, grey, cpus=processes)
        blocks = iter(dataset.iter_torch_batches(batch_size=None))
        for epoch, places in run.items():
            batches = pipeline.epoch_batches(blocks, len(places), config.batch_size, epoch)
            n, seconds, nbytes = consume(batches, len(places))
            rates.append(n / seconds)
        if next(blocks, None) is not None:
            raise AssertionError("rows left after the last epoch")
        return rates, nbytes, dataset.stats(), warm_s
    finally:
        ray.shutdown()


def parts(rows, config, grey: bool, limit: int = 64) -> dict[str, float]:
    """Milliseconds per image of each part of the work, in this process."""
    rows = rows.iloc[:limit]
    augment.augmentation(config.crop_height, config.crop_width)  # its import, once
    columns = path_columns(config.modalities)
    timings = {}

    start = time.perf_counter()
    images = [read_stack([row[c] for c in columns], grey) for _, row in rows.iterrows()]
    timings["read JPEG"] = time.perf_counter() - start

    start = time.perf_counter()
    masks = []
    for (_, row), image in zip(rows.iterrows(), images):
        masks.append(rle.decode_bits([row[c] for c in RLE_COLUMNS], *image.shape[:2]))
    timings["decode RLE to class bits"] = time.perf_counter() - start

    batch = config.batch_size
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        out = augment.augment_batch(
            {"image": images[i : i + batch], "mask": masks[i : i + batch],
             "sample": np.arange(i, i + len(images[i : i + batch]))},
            config.crop_height, config.crop_width, config.seed,
        )  # fmt: skip
        {k: torch.from_numpy(v) for k, v in out.items()}
    timings["augment + stack + to tensors"] = time.perf_counter() - start
    return {k: 1e3 * v / len(images) for k, v in timings.items()}


def bench_size(height, width, data, images, processes, epochs, batch, channels) -> list[dict]:
    crop = CROPS.get((height, width), (0, 0))
    with tempfile.TemporaryDirectory() as tmp:
        if data is None:
            data = synth.write_dataset(
                Path(tmp) / "data", images, height=height, width=width, seed=0
            )
        rows = catalog.load(data, decode_images=False).iloc[:images]
        config = TrainConfig(
            data=str(data), batch_size=batch, crop_height=crop[0], crop_width=crop[1]
        )
        label = f"{height}x{width}" + (f" crop {crop[0]}x{crop[1]}" if crop[0] else "")
        results = []
        for kind in channels:
            grey = kind == "grey"
            per_image = parts(rows, config, grey)
            print(f"\n{label}, {kind}, {len(rows)} images, batches of {batch}; ms per image in "
                  "one process:")  # fmt: skip
            for name, ms in per_image.items():
                print(f"  {name:30s} {ms:7.2f}")
            one_process = 1e3 / sum(per_image.values())
            for p in processes:
                loader = with_dataloader(rows, config, p, epochs, grey)
                ray_rates, nbytes, stats, warm_s = with_ray(rows, config, p, epochs, grey)
                cold, *_ = with_ray(rows, config, p, 1, grey, warm=False)
                unreserved, *_ = with_ray(rows, config, p, epochs, grey, allocator=False)
                row = {
                    "size": label,
                    "channels": kind,
                    "processes": p,
                    "images": len(rows),
                    "bytes_per_image": nbytes,
                    "dataloader_first": loader[0],
                    "dataloader": max(loader[1:]),
                    "ray_warm_up_s": warm_s,
                    "ray_first": ray_rates[0],
                    "ray_first_cold": cold[0],
                    "ray": max(ray_rates[1:]),
                    "ray_no_reservation": max(unreserved[1:]),
                }
                row["ray_vs_dataloader"] = row["ray"] / row["dataloader"]
                row["ray_first_vs_later"] = row["ray"] / row["ray_first"]
                row["parts_ms_per_image"] = per_image
                row["in_process_images_per_s"] = one_process
                row["ray_data_stats"] = stats
                results.append(row)
                print(table([row], list(row)[:-3]))
        return results


def targets(results: list[dict]) -> list[dict]:
    """The issue's targets for Ray Data at 2 processes, MET or MISSED, per size and channels."""
    found = []
    for row in results:
        if row["processes"] != 2:
            continue
        for name, value, limit, at_least in (
            ("ray / dataloader, later epochs", row["ray_vs_dataloader"], 0.9, True),
            ("ray later / first epoch", row["ray_first_vs_later"], 1.5, False),
        ):
            met = value >= limit if at_least else value <= limit
            found.append({"size": row["size"], "channels": row["channels"], "target": name,
                          "value": value, "limit": f"{'>=' if at_least else '<='} {limit}",
                          "result": "MET" if met else "MISSED"})  # fmt: skip
    return found


def cores_per_gpu(results: list[dict]) -> dict:
    """From the per-process rates at 256x1600 (crop 256x800), the CPU cores that keep up with one
    GPU's step (the H100 figure in docs/performance.md): with Ray Data, what steelseg runs, and
    with the DataLoader for reference."""
    rows = [r for r in results if r["size"].startswith("256x1600")]
    if not rows:
        return {}
    crop = rows[0]["size"].split("crop ")[-1]
    gpu = GPU_STEP_IMAGES_PER_S.get(crop, GPU_STEP_IMAGES_PER_S["256x1600"])
    found = {"gpu_step_images_per_s": gpu}
    for system in ("ray", "dataloader"):
        per_process = max(r[system] / r["processes"] for r in rows)
        found[system] = {"per_process": per_process, "cores_per_gpu": gpu / per_process}
        print(
            f"feeding one H100's step at {crop} ({gpu:.0f} images/s, bf16, batch 8) with "
            f"{system}: {per_process:.1f} images/s per process -> {gpu / per_process:.1f} cores"
        )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32x160,64x320,256x1600")
    parser.add_argument("--processes", default="1,2", help="comma-separated CPU process counts")
    parser.add_argument("--images", type=int, default=0, help="an epoch; 0: see above")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--data", help="a data set folder (train.csv + train_images) to use")
    parser.add_argument("--channels", default="grey", help="grey, rgb or grey,rgb (see above)")
    parser.add_argument("--json", default="pipeline_cpu.json", help="'' to write none")
    args = parser.parse_args()
    processes = [int(p) for p in args.processes.split(",")]
    results = []
    for size in args.sizes.split(","):
        height, width = (int(x) for x in size.split("x"))
        images = args.images or int(np.clip(EPOCH_PIXELS / (height * width), 400, MAX_IMAGES))
        results += bench_size(
            height, width, args.data, images, processes, args.epochs, args.batch,
            args.channels.split(","),
        )  # fmt: skip
    shown = [k for k in results[0] if k not in ("parts_ms_per_image", "ray_data_stats")]
    print("\n" + table(results, shown))
    print("\nRay Data stats of the last epoch, per size and channels (2 processes or the most):")
    for row in results:
        if row["processes"] == max(processes):
            print(f"--- {row['size']}, {row['channels']}\n{row['ray_data_stats']}")
    met = targets(results)
    if met:
        print("\n" + table(met, list(met[0])))
    feeding = cores_per_gpu(results)
    if args.json:
        record(results, args.json, cores_per_gpu=feeding, targets=met)


if __name__ == "__main__":
    main()
