"""A run's training epochs through Ray Data: one dataset for all of them (as a Train worker reads)
against a dataset an epoch, and tasks of several sizes, over the same rows and work.

    python benchmarks/probe_ray_data_run.py                       # 2,000 images of 256x1600
    python benchmarks/probe_ray_data_run.py --data DATA --images 4000 --epochs 4
    python benchmarks/probe_ray_data_run.py --channels rgb --variants 3   # RGB, steelseg's cut

Each variant starts Ray with ``--cpus`` CPUs, runs ``pipeline.warm_up`` and reads ``--epochs``
epochs of ``--images`` rows (crops 256x800, ``--channels``, batches of 8) in this process,
which does nothing else: ``run`` through one ``pipeline.train_dataset`` of all the epochs and
``pipeline.epoch_batches``, ``per-epoch`` through a ``train_dataset`` of each epoch alone.
``TASK_PIXELS`` and ``TASKS_PER_CPU`` are replaced as each variant names them. It prints each
epoch's images/s, the rate over the epochs after the first (the figure compared), and, from
the parts each task augments (``pipeline.train_task`` wrapped: a measurement aid, not a patch
of Ray), the decode processes' busy share after the first epoch and the seconds their tasks
sat paused after handing Ray a block. Every epoch is checked to deliver its rows exactly once.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from common import record, table

from steelseg.config import TrainConfig
from steelseg.data import catalog, pipeline, synth

# (name, one dataset for the run, TASK_PIXELS, TASKS_PER_CPU)
VARIANTS = [
    ("per-epoch, tasks of 2^27 px, 4 a CPU", False, 2**27, 4),
    ("run, tasks of 2^27 px, 4 a CPU", True, 2**27, 4),
    ("run, tasks of 2^28 px, 1 a CPU", True, 2**28, 1),
    ("run, tasks of 2^29 px, 1 a CPU", True, 2**29, 1),
]


def timed(spans: str):
    """``pipeline.train_task``, appending (pid, part's start, its end, when the task was resumed
    after handing the part on) to ``spans``."""
    train_task = pipeline.train_task

    def timed_train_task(rows, *args, **kwargs):
        parts = train_task(rows, *args, **kwargs)
        while True:
            start = time.time()
            out = next(parts, None)
            end = time.time()
            if out is None:
                return
            yield out
            with open(spans, "a") as f:
                f.write(json.dumps([os.getpid(), start, end, time.time()]) + "\n")

    return timed_train_task


def epochs_of(one_dataset: bool, rows, config, cpus: int, run: dict, grey: bool):
    """Each epoch's batches, from one dataset or a dataset each."""
    if not one_dataset:
        for epoch, places in run.items():
            dataset = pipeline.train_dataset(rows, {epoch: places}, config, grey, cpus)
            yield dataset.iter_torch_batches(batch_size=config.batch_size)
        return
    dataset = pipeline.train_dataset(rows, run, config, grey, cpus)
    blocks = iter(dataset.iter_torch_batches(batch_size=None))
    for epoch, places in run.items():
        yield pipeline.epoch_batches(blocks, len(places), config.batch_size, epoch)
    if next(blocks, None) is not None:
        raise AssertionError("rows left after the last epoch")


def probe(rows, config, cpus: int, epochs: int, variant: tuple, spans: str, grey: bool) -> dict:
    name, one_dataset, task_pixels, tasks_per_cpu = variant
    pipeline.TASK_PIXELS, pipeline.TASKS_PER_CPU = task_pixels, tasks_per_cpu
    Path(spans).unlink(missing_ok=True)
    run = {e: pipeline.train_samples(len(rows), config.seed, e, 0, 1) for e in range(epochs)}
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        pipeline.ordered_context()
        ray.get(pipeline.warm_up(config, cpus))
        start = time.time()
        ends: list[float] = []
        first_batch = 0.0
        epochs_read = epochs_of(one_dataset, rows, config, cpus, run, grey)
        for batches, places in zip(epochs_read, run.values()):
            taken = []
            for batch in batches:
                first_batch = first_batch or time.time() - start
                taken.append(batch["sample"].numpy())
            seen = np.concatenate(taken)
            if len(seen) != len(places) or len(np.unique(seen)) != len(places):
                raise AssertionError(f"{len(np.unique(seen))} distinct rows, not {len(places)}")
            ends.append(time.time() - start)
    finally:
        ray.shutdown()
    parts: dict[int, list] = {}
    first: dict[int, float] = {}
    for pid, begin, end, resumed in map(json.loads, Path(spans).read_text().splitlines()):
        if begin - start > ends[0]:
            parts.setdefault(pid, []).append((end - begin, resumed - end))
        elif end - start <= ends[0]:
            first[pid] = first.get(pid, 0.0) + end - begin
    later = ends[-1] - ends[0]
    cut = pipeline.train_blocks(rows, config, grey, cpus)
    return {
        "variant": name,
        "task": cut.task,
        "block": cut.block,
        "epochs_images_per_s": [round(len(rows) / (b - a)) for a, b in zip([0, *ends], ends)],
        "later_images_per_s": round(len(rows) * (epochs - 1) / later, 1),
        "first_batch_s": round(first_batch, 2),
        "busy_share_first": sorted((round(w / ends[0], 2) for w in first.values()), reverse=True),
        "busy_share_later": sorted(
            (round(sum(w for w, _ in p) / later, 2) for p in parts.values()), reverse=True
        ),
        "paused_s_later": round(sum(s for p in parts.values() for _, s in p), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="a data set folder of 256x1600 images; default: synthetic")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant")
    parser.add_argument("--channels", choices=["grey", "rgb"], default="grey")
    parser.add_argument(
        "--variants", default="0,1,2,3", help="which of VARIANTS, by index (3: steelseg's cut)"
    )
    parser.add_argument("--json", default="ray_data_run_cpu2.json")
    args = parser.parse_args()
    grey, chosen = args.channels == "grey", [VARIANTS[int(i)] for i in args.variants.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or synth.write_dataset(Path(tmp) / "data", args.images, seed=0)
        rows = catalog.load(data, decode_images=False).iloc[: args.images]
        config = TrainConfig(data=str(data), batch_size=8, crop_height=256, crop_width=800)
        pipeline.train_task = timed(f"{tmp}/spans.jsonl")
        found = [
            probe(rows, config, args.cpus, args.epochs, variant, f"{tmp}/spans.jsonl", grey)
            for _ in range(args.repeats)
            for variant in chosen
        ]
    print(table(found, list(found[0])))
    if args.json:
        record(
            found, args.json, images=len(rows), epochs=args.epochs, cpus=args.cpus,
            channels=args.channels,
        )  # fmt: skip


if __name__ == "__main__":
    main()
