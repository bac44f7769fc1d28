"""A run's first epoch through Ray Data with and without Ray Data's autoscaling coordinator
started before the run's dataset (as Ray Train's controller starts it before its workers),
over the same rows and work.

    python benchmarks/probe_ray_data_start.py                  # 64x320 and 256x1600, 3 runs each
    python benchmarks/probe_ray_data_start.py --sizes 256x1600 --repeats 5 --channels rgb

Each run starts Ray with ``--cpus`` CPUs, as a job's first driver finds it (no Ray Data actor
yet), runs ``pipeline.warm_up`` and waits for it, then, in ``imports + actors``, starts Ray
Data's actors (``common.start_ray_data_actors``: a dataset of one row), then reads ``--epochs``
epochs (``--channels``, batches of 8, crops 256x800 at 256x1600) from one
``pipeline.train_dataset`` with ``pipeline.epoch_batches``, as a Train worker does, in this
process, which does nothing else.
``imports only`` is what a script that reads the pipeline without Ray Train finds;
``imports + actors`` what a Train worker finds. It prints
each epoch's images/s, the seconds to the first batch and the best later epoch over the first.
Every epoch is checked to deliver its rows exactly once.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
from common import record, start_ray_data_actors, table

from steelseg.config import TrainConfig
from steelseg.data import catalog, pipeline, synth

CROPS = {(256, 1600): (256, 800)}
IMAGES = {(64, 320): 20_000, (256, 1600): 4_000}  # as bench_pipeline's epochs
VARIANTS = {"imports only": lambda: None, "imports + actors": start_ray_data_actors}


def probe(rows, config, cpus: int, epochs: int, variant: str, grey: bool) -> dict:
    run = {e: pipeline.train_samples(len(rows), config.seed, e, 0, 1) for e in range(epochs)}
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        pipeline.ordered_context()
        ray.get(pipeline.warm_up(config, cpus))
        VARIANTS[variant]()
        dataset = pipeline.train_dataset(rows, run, config, grey, cpus)
        start = time.perf_counter()
        blocks = iter(dataset.iter_torch_batches(batch_size=None))
        rates, first_batch = [], 0.0
        for epoch, places in run.items():
            began, seen = time.perf_counter(), []
            for batch in pipeline.epoch_batches(blocks, len(places), config.batch_size, epoch):
                first_batch = first_batch or time.perf_counter() - start
                seen.append(batch["sample"].numpy())
            rates.append(len(places) / (time.perf_counter() - began))
            seen = np.concatenate(seen)
            if len(seen) != len(places) or len(np.unique(seen)) != len(places):
                raise AssertionError(f"{len(np.unique(seen))} distinct rows, not {len(places)}")
    finally:
        ray.shutdown()
    return {
        "variant": variant,
        "epochs_images_per_s": [round(r) for r in rates],
        "first_batch_s": round(first_batch, 2),
        "later_vs_first": round(max(rates[1:]) / rates[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64x320,256x1600")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant")
    parser.add_argument("--channels", choices=["grey", "rgb"], default="grey")
    parser.add_argument("--json", default="ray_data_start_cpu2.json")
    args = parser.parse_args()
    found, grey = [], args.channels == "grey"
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            height, width = map(int, size.split("x"))
            images = IMAGES.get((height, width), 4_000)
            data = synth.write_dataset(Path(tmp) / size, images, height=height, width=width, seed=0)
            rows = catalog.load(data, decode_images=False).iloc[:images]
            crop = CROPS.get((height, width), (0, 0))
            config = TrainConfig(
                data=str(data), batch_size=8, crop_height=crop[0], crop_width=crop[1]
            )
            for _ in range(args.repeats):
                for variant in VARIANTS:
                    found_here = probe(rows, config, args.cpus, args.epochs, variant, grey)
                    row = {"size": size, "channels": args.channels, **found_here}
                    print(row, flush=True)
                    found.append(row)
    print(table(found, list(found[0])))
    if args.json:
        record(found, args.json, epochs=args.epochs, cpus=args.cpus)


if __name__ == "__main__":
    main()
