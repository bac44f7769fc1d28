"""Where Ray Data's second core goes: the execution limits its resource manager sees over each
epoch's dataset, and how many decode tasks run, sampled at every scheduling decision.

    python benchmarks/probe_ray_data_limits.py                     # 256x1600, 400 images
    python benchmarks/probe_ray_data_limits.py --size 64x320 --images 1562

Ray starts with ``--cpus`` CPUs; each epoch reads its rows through a ``pipeline.train_dataset`` of
its own and ``iter_torch_batches``: a new executor each epoch (a Train worker reads all its
training epochs from one dataset).
Ray Data 2.60 takes its limits from the reservation its autoscaling coordinator (an actor) makes
for each executor; the resource manager asks for it without waiting and caches what it has for
a second, so a new executor runs with CPU limits of 0 until the answer arrives, and meanwhile
only the one task Ray Data always allows an idle operator. The probe wraps the allocator's
``can_submit_new_task`` (read only: it returns what Ray decided) to record, per half-second of
each epoch, the most tasks running and the CPU limit, and from Ray Data's stats the decode
tasks' summed time over the epoch's (2.0 would be two tasks all along). ``--consumer arrow``
takes the blocks as they are, without the conversion to torch batches; ``--unordered`` turns
``preserve_order`` off. This is a measurement aid; steelseg does not patch Ray.
"""

import argparse
import re
import tempfile
import time
from pathlib import Path

from common import record, table

from steelseg.config import TrainConfig
from steelseg.data import catalog, pipeline, synth

CROPS = {(256, 1600): (256, 800), (64, 320): (64, 160)}


def probe(
    data: Path,
    size: tuple[int, int],
    cpus: int,
    epochs: int,
    images: int,
    consumer: str,
    ordered: bool,
) -> list[dict]:
    import ray
    import ray.data
    from ray.data._internal.execution import resource_manager

    allocator = resource_manager.ReservationOpResourceAllocator
    decide = allocator.can_submit_new_task
    samples: list[tuple[float, int, float]] = []
    start = [time.perf_counter()]

    def watched(self, op):
        allowed = decide(self, op)
        limits = self._resource_manager.get_global_limits()
        samples.append((time.perf_counter() - start[0], op.num_active_tasks(), limits.cpu))
        return allowed

    allocator.can_submit_new_task = watched
    rows = catalog.load(data, decode_images=False).iloc[:images]
    crop = CROPS.get(size, size)
    config = TrainConfig(data=str(data), batch_size=8, crop_height=crop[0], crop_width=crop[1])
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    out = []
    try:
        pipeline.ordered_context()
        ray.data.DataContext.get_current().execution_options.preserve_order = ordered
        ray.get(pipeline.warm_up(config, cpus))
        for epoch in range(epochs):
            epoch_rows = pipeline.train_rows(rows, config.seed, epoch, rank=0, world=1)
            places = {epoch: epoch_rows.index.to_numpy()}
            dataset = pipeline.train_dataset(rows, places, config, grey=True)
            samples.clear()
            start[0] = time.perf_counter()
            if consumer == "torch":  # as a Train worker reads
                n = sum(len(b["image"]) for b in dataset.iter_torch_batches(batch_size=8))
            else:  # the blocks as they are: no conversion, no batching in this process
                n = sum(
                    b.num_rows
                    for b in dataset.iter_batches(batch_size=None, batch_format="pyarrow")
                )
            seconds = time.perf_counter() - start[0]
            task_s = tasks_seconds(dataset.stats())
            zero = [t for t, _, cpu in samples if cpu == 0]
            two = [t for t, active, _ in samples if active >= 2]
            out.append(
                {
                    "size": f"{size[0]}x{size[1]}",
                    "epoch": epoch + 1,
                    "consumer": consumer,
                    "ordered": ordered,
                    "images_per_s": round(n / seconds, 1),
                    "epoch_s": round(seconds, 2),
                    "tasks_s_per_epoch_s": round(task_s / seconds, 2),
                    "cpu_limit_0_until_s": round(max(zero), 2) if zero else 0.0,
                    "first_second_task_s": round(min(two), 2) if two else None,
                    "timeline": half_seconds(samples),
                }
            )
    finally:
        ray.shutdown()
        allocator.can_submit_new_task = decide
    return out


def tasks_seconds(stats: str) -> float:
    """The decode operator's summed task wall time, from Ray Data's stats text."""
    totals = re.findall(r"Remote wall time: .* ([0-9.]+)(ms|s) total", stats)
    value, unit = totals[-1]
    return float(value) / (1000 if unit == "ms" else 1)


def half_seconds(samples: list[tuple[float, int, float]]) -> list[list[float]]:
    """[start of the half-second, most tasks running, lowest CPU limit] per half-second."""
    buckets: dict[float, list[float]] = {}
    for t, active, cpu in samples:
        b = buckets.setdefault(int(t * 2) / 2, [0, float("inf")])
        b[0], b[1] = max(b[0], active), min(b[1], cpu)
    return [[k, *v] for k, v in sorted(buckets.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256x1600", help="HxW")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data", help="a data set folder to read (default: synthetic)")
    parser.add_argument("--consumer", choices=["torch", "arrow"], default="torch")
    parser.add_argument("--unordered", action="store_true", help="preserve_order off")
    parser.add_argument("--json", default="ray_data_limits_cpu2.json")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            synth.write_dataset(data, args.images, height=height, width=width)
        rows = probe(
            data,
            (height, width),
            args.cpus,
            args.epochs,
            args.images,
            args.consumer,
            not args.unordered,
        )
    columns = [
        "size",
        "consumer",
        "ordered",
        "epoch",
        "images_per_s",
        "epoch_s",
        "tasks_s_per_epoch_s",
    ]
    columns += ["cpu_limit_0_until_s"]
    print(table(rows, [*columns, "first_second_task_s"]))
    for row in rows:
        print(f"epoch {row['epoch']}: [t, most tasks, CPU limit]", row["timeline"])
    record(rows, args.json)


if __name__ == "__main__":
    main()
