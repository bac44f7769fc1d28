"""Where Ray Data's time goes between the work: each decode process's busy share, the gaps
between its tasks, and the CPU each process of the machine used, over epochs each read through a
``pipeline.train_dataset`` of its own (a Train worker reads all its epochs from one dataset).

    python benchmarks/probe_ray_data_tasks.py --data DATA --images 4000     # 256x1600 data
    python benchmarks/probe_ray_data_tasks.py --data DATA --task-pixels 16777216 --block-bytes 0

Each part ``pipeline.train_task`` augments in a Ray worker appends (process, start, end, Ray
task id) to a file; a task spans its parts, from the first's start to the last's end, so
its gap to the next task of its process holds the block it emits last, the executor noticing its
end and the next task's dispatch and start. Per epoch it
prints the images/s, each decode process's busy share of the epoch, the median work of a task,
the median and largest gap between a process's tasks, and every process's CPU seconds per
second of the epoch (``psutil``), so that time the decode processes spend idle, and CPU the
driver and Ray's daemons take, show apart. ``--task-pixels`` and ``--block-bytes`` replace the
pipeline's ``TASK_PIXELS`` and ``BLOCK_BYTES`` (``--block-bytes 0``: Ray Data's default block
size, one block a task). A measurement aid: it wraps steelseg's function, not Ray.
"""

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
from common import record, table

from steelseg.config import TrainConfig
from steelseg.data import catalog, pipeline

CROPS = {(256, 1600): (256, 800)}


def timed(spans: str):
    """``pipeline.train_task``, appending (pid, start, end, task) of each part it augments to
    ``spans``."""
    train_task = pipeline.train_task

    def timed_train_task(rows, *args, **kwargs):
        task = ray.get_runtime_context().get_task_id()
        parts = train_task(rows, *args, **kwargs)
        while True:
            start = time.time()
            out = next(parts, None)
            if out is None:
                return
            with open(spans, "a") as f:
                f.write(json.dumps([os.getpid(), start, time.time(), task]) + "\n")
            yield out

    return timed_train_task


def cpu_seconds() -> dict[tuple[int, str], float]:
    import psutil  # Ray's copy: importing ray puts it on the path

    found = {}
    for p in psutil.process_iter(["name"]):
        try:
            times = p.cpu_times()
        except psutil.Error:
            continue
        found[p.pid, p.info["name"]] = times.user + times.system
    return found


def tasks(calls: list[list]) -> dict[int, list[tuple[float, float]]]:
    """Per process, its tasks' (first call's start, last call's end), in order."""
    spans: dict[tuple[int, str], tuple[float, float]] = {}
    for pid, start, end, task in calls:
        first, _ = spans.get((pid, task), (start, end))
        spans[pid, task] = (min(first, start), end)
    found: dict[int, list[tuple[float, float]]] = {}
    for (pid, _), span in sorted(spans.items(), key=lambda kv: kv[1]):
        found.setdefault(pid, []).append(span)
    return found


def probe(rows, config, cpus: int, epochs: int, spans: str) -> list[dict]:
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    out = []
    try:
        pipeline.ordered_context()
        ray.get(pipeline.warm_up(config, cpus))
        for epoch in range(epochs):
            Path(spans).unlink(missing_ok=True)
            epoch_rows = pipeline.train_rows(rows, config.seed, epoch, rank=0, world=1)
            places = {epoch: epoch_rows.index.to_numpy()}
            dataset = pipeline.train_dataset(rows, places, config, grey=True, cpus=cpus)
            before, start = cpu_seconds(), time.perf_counter()
            n = sum(len(b["image"]) for b in dataset.iter_torch_batches(batch_size=8))
            seconds = time.perf_counter() - start
            after = cpu_seconds()
            calls = [json.loads(line) for line in Path(spans).read_text().splitlines()]
            runs = tasks(calls)
            work = [end - begin for r in runs.values() for begin, end in r]
            gaps = [b[0] - a[1] for r in runs.values() for a, b in itertools.pairwise(r)]
            cpu = {
                f"{name} {pid}": round((after[pid, name] - before.get((pid, name), 0)) / seconds, 2)
                for pid, name in after
                if after[pid, name] - before.get((pid, name), 0) > 0.02 * seconds
            }
            out.append(
                {
                    "epoch": epoch + 1,
                    "images_per_s": round(n / seconds, 1),
                    "epoch_s": round(seconds, 2),
                    "tasks": len(work),
                    "busy_share": sorted(
                        (round(sum(e - b for b, e in r) / seconds, 2) for r in runs.values()),
                        reverse=True,
                    ),
                    "task_work_s": round(statistics.median(work), 3),
                    "gap_median_s": round(statistics.median(gaps), 3) if gaps else None,
                    "gap_max_s": round(max(gaps), 3) if gaps else None,
                    "cpu_per_s": dict(sorted(cpu.items(), key=lambda kv: -kv[1])),
                }
            )
    finally:
        ray.shutdown()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a data set folder")
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--task-pixels", type=int, help="replaces pipeline.TASK_PIXELS")
    parser.add_argument("--block-bytes", type=int, help="replaces pipeline.BLOCK_BYTES")
    parser.add_argument("--json", default="ray_data_tasks_cpu2.json")
    args = parser.parse_args()
    if args.task_pixels:
        pipeline.TASK_PIXELS = args.task_pixels
    if args.block_bytes is not None:
        pipeline.BLOCK_BYTES = args.block_bytes or 2**40  # 0: one block a task
    rows = catalog.load(args.data, decode_images=False).iloc[: args.images]
    size = int(rows["height"].max()), int(rows["width"].max())
    crop = CROPS.get(size, (0, 0))
    config = TrainConfig(data=args.data, batch_size=8, crop_height=crop[0], crop_width=crop[1])
    with tempfile.TemporaryDirectory() as tmp:
        pipeline.train_task = timed(str(Path(tmp) / "spans.jsonl"))
        found = probe(rows, config, args.cpus, args.epochs, f"{tmp}/spans.jsonl")
    for row in found:
        row.update(size=f"{size[0]}x{size[1]}", task_pixels=pipeline.TASK_PIXELS)
    columns = ["epoch", "images_per_s", "epoch_s", "tasks", "busy_share", "task_work_s"]
    print(table(found, [*columns, "gap_median_s", "gap_max_s"]))
    for row in found:
        print(f"epoch {row['epoch']} CPU seconds per second:", row["cpu_per_s"])
    epoch_rows = pipeline.train_rows(rows, config.seed, 0, rank=0, world=1)
    cut = pipeline.train_blocks(epoch_rows, config, grey=True, cpus=args.cpus)
    record(found, args.json, cut=cut._asdict())


if __name__ == "__main__":
    main()
