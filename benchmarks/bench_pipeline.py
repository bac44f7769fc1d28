"""The training data pipeline: images/s delivered to the training loop by Ray Data and by a plain
``torch.utils.data.DataLoader`` doing the same work with the same number of CPU processes.

    python benchmarks/bench_pipeline.py      # 32x160, 64x320, 256x1600 (crop 256x800)
    python benchmarks/bench_pipeline.py --sizes 256x1600 --processes 1,2,4 --data /data/severstal

The work per batch is the same code in both: ``steelseg.data.pipeline.read_batch`` (JPEG decode,
RLE decode of the 4 classes, class bits) and ``augment_batch`` (random crop, flips,
brightness/contrast) on shuffled rows in batches of ``--batch``, ending as uint8 torch tensors in
the consuming process, which does nothing else (the GPU's step is not simulated). Ray runs with
``num_cpus`` = processes (each ``map_batches`` task takes one CPU) and the consumer iterates
``iter_torch_batches``, as a Train worker does; the DataLoader runs ``num_workers`` = processes,
persistent, with ``batch_size=None`` over a batch sampler. The first epoch includes starting the
processes; the figure compared is the best later epoch.

It also times each part of the work in this process, one image at a time, and from the
per-process rate at 256x1600 states how many CPU cores feed one GPU's training step.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import record, table

from steelseg.config import TrainConfig
from steelseg.data import augment, catalog, pipeline, rle, synth
from steelseg.data.images import path_columns, read_stack
from steelseg.domain import RLE_COLUMNS

# crops as the README's recipe trains at each size: whole small images, 256x800 of the real size
CROPS = {(256, 1600): (256, 800)}
# H100, bf16 + channels_last, batch 8 (README, Benchmarks): 138 images/s on whole 256x1600
# images; a 256x800 crop is half the pixels and the step is linear in them, so about 2 x 138
GPU_STEP_IMAGES_PER_S = {"256x1600": 138.0, "256x800": 276.0}


class CatalogBatches(torch.utils.data.Dataset):
    """The DataLoader's side: a batch of rows per index list, through the pipeline's functions."""

    def __init__(self, rows, config: TrainConfig):
        columns = ["image_id", *path_columns(config.modalities), *RLE_COLUMNS]
        self.columns = {c: rows[c].to_numpy() for c in columns}
        self.config = config

    def __len__(self) -> int:
        return len(self.columns["image_id"])

    def __getitem__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        config = self.config
        rows = {c: values[indices] for c, values in self.columns.items()}
        batch = pipeline.read_batch(rows, config.modalities)
        out = augment.augment_batch(batch, config.crop_height, config.crop_width, config.seed)
        return {k: torch.from_numpy(v) for k, v in out.items()}


def consume(batches) -> tuple[int, float]:
    """(images, seconds) to take every batch."""
    start, n = time.perf_counter(), 0
    for batch in batches:
        n += batch["image"].shape[0]
    return n, time.perf_counter() - start


def with_dataloader(rows, config, processes: int, epochs: int) -> list[float]:
    dataset = CatalogBatches(rows, config)
    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(dataset), config.batch_size, drop_last=False
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        num_workers=processes,
        persistent_workers=True,
        prefetch_factor=2,
    )
    rates = []
    for _ in range(epochs):
        n, seconds = consume(loader)
        rates.append(n / seconds)
    del loader
    return rates


def with_ray(rows, config, processes: int, epochs: int, allocator: bool = True) -> list[float]:
    """``allocator=False`` turns off Ray Data's per-operator resource reservation (a kill-switch
    Ray marks for removal; measured, not used by steelseg)."""
    import ray

    ray.init(num_cpus=processes, include_dashboard=False, log_to_driver=False)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.op_resource_reservation_enabled = allocator
        pipeline.ordered_context()  # as a Train worker reads: one rank, its epoch's rows in order
        rates = []
        for epoch in range(epochs):
            epoch_rows = pipeline.train_rows(rows, config.seed, epoch, rank=0, world=1)
            dataset = pipeline.train_dataset(epoch_rows, config, epoch)
            n, seconds = consume(dataset.iter_torch_batches(batch_size=config.batch_size))
            rates.append(n / seconds)
        return rates
    finally:
        ray.shutdown()


def parts(rows, config, limit: int = 64) -> dict[str, float]:
    """Milliseconds per image of each part of the work, in this process."""
    rows = rows.iloc[:limit]
    augment.augmentation(config.crop_height, config.crop_width)  # its import, once
    columns = path_columns(config.modalities)
    timings = {}

    start = time.perf_counter()
    images = [read_stack([row[c] for c in columns]) for _, row in rows.iterrows()]
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
            {
                "image": np.stack(images[i : i + batch]),
                "mask": np.stack(masks[i : i + batch]),
                "image_id": rows["image_id"].to_numpy()[i : i + batch],
            },
            config.crop_height,
            config.crop_width,
            config.seed,
        )
        {k: torch.from_numpy(v) for k, v in out.items()}
    timings["stack + augment + to tensors"] = time.perf_counter() - start
    return {k: 1e3 * v / len(images) for k, v in timings.items()}


def bench_size(height, width, data, images, processes, epochs, batch) -> list[dict]:
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
        per_image = parts(rows, config)
        print(f"\n{label}, {len(rows)} images, batches of {batch}; ms per image in one process:")
        for name, ms in per_image.items():
            print(f"  {name:30s} {ms:7.2f}")
        one_process = 1e3 / sum(per_image.values())
        results = []
        for p in processes:
            loader = with_dataloader(rows, config, p, epochs)
            ray_rates = with_ray(rows, config, p, epochs)
            unreserved = with_ray(rows, config, p, epochs, allocator=False)
            row = {
                "size": label,
                "processes": p,
                "images": len(rows),
                "dataloader_first": loader[0],
                "dataloader": max(loader[1:]),
                "ray_first": ray_rates[0],
                "ray": max(ray_rates[1:]),
                "ray_no_reservation": max(unreserved[1:]),
            }
            row["ray_vs_dataloader"] = row["ray"] / row["dataloader"]
            row["parts_ms_per_image"] = per_image
            row["in_process_images_per_s"] = one_process
            results.append(row)
            print(table([row], list(row)[:-2]))
        return results


def cores_per_gpu(results: list[dict]) -> dict:
    """From the per-process rates at 256x1600 (crop 256x800), the CPU cores that keep up with one
    GPU's step (the README's H100 figure): with Ray Data, what steelseg runs, and with the
    DataLoader for reference."""
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
    parser.add_argument("--images", type=int, default=0, help="per size; 0: about 30 s of work")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--data", help="a data set folder (train.csv + train_images) to use")
    parser.add_argument("--json", default="pipeline_cpu.json", help="'' to write none")
    args = parser.parse_args()
    processes = [int(p) for p in args.processes.split(",")]
    results = []
    for size in args.sizes.split(","):
        height, width = (int(x) for x in size.split("x"))
        images = args.images or int(np.clip(32_000_000 / (height * width), 400, 1600))
        results += bench_size(height, width, args.data, images, processes, args.epochs, args.batch)
    print("\n" + table(results, [k for k in results[0] if k != "parts_ms_per_image"]))
    feeding = cores_per_gpu(results)
    if args.json:
        record(results, args.json, cores_per_gpu=feeding)


if __name__ == "__main__":
    main()
