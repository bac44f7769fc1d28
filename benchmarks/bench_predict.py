"""Prediction throughput at the real size (256x1600): images/s with and without flip TTA.

    python benchmarks/bench_predict.py bare --device cuda --batch 16      # the model step alone
    python benchmarks/bench_predict.py ray --images DIR --checkpoint RUN  # Ray Data actors, CPU
    python benchmarks/bench_predict.py ray --synthetic 24 --actors 2      # a synthetic folder,
                                                                           # an untrained model

``bare`` times what a prediction actor does per batch (normalise, forward at full size, sigmoid,
TTA, post-process and RLE-encode the 4 masks of each image) on in-memory images, so it needs
neither Ray nor a trained checkpoint: a U-Net initialised as for training, whose head prior
predicts almost nothing, so the RLE strings are short, as on mostly clean steel.
``ray`` times ``steelseg.inference.predict.predict`` end to end (JPEG decode included) on a folder.
"""

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from common import record

from steelseg.config import TrainConfig
from steelseg.data import rle
from steelseg.inference.postprocess import Rules
from steelseg.inference.predict import prepare, probability_tensor
from steelseg.training import recipe


def bare(device: torch.device, batch: int, batches: int, tta: bool, height: int, width: int):
    torch.manual_seed(0)
    model = prepare(recipe.build_model(TrainConfig()), device)  # as a prediction actor does
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (batch, height, width, 3), dtype=np.uint8)
    rules = Rules.plain(0.5)

    def run_batch():  # what Predictor.__call__ does after decoding
        masks, present = rules.apply_batch(probability_tensor(model, images, device, tta))
        for b, c in zip(*np.nonzero(present)):
            rle.encode(masks[b, c])

    run_batch()  # warm-up (cuDNN autotune, allocations)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(batches):
        run_batch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "mode": "bare",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "size": f"{height}x{width}",
        "batch": batch,
        "tta": tta,
        "images_per_s": round(batch * batches / seconds, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
        if device.type == "cuda"
        else None,
    }


def with_ray(checkpoint: str, images: str, batch: int, actors: int, tta: bool):
    from steelseg.inference.predict import predict

    start = time.perf_counter()
    table = predict(
        checkpoint,
        images,
        batch_size=batch,
        actors=actors,
        tta=tta,
        progress=False,
    )
    seconds = time.perf_counter() - start
    n = len(table) // 4
    return {"mode": "ray", "images": n, "actors": actors, "batch": batch, "tta": tta,
            "seconds": round(seconds, 1), "images_per_s": round(n / seconds, 2)}  # fmt: skip


def synthetic_checkpoint(folder: str, images: int, height: int, width: int) -> tuple[str, str]:
    """A synthetic image folder and a checkpoint of an untrained model: what ``ray`` needs on a
    fresh clone (the time does not depend on the weights)."""
    from steelseg import runs
    from steelseg.data import synth

    data = synth.write_dataset(f"{folder}/data", images, height=height, width=width, seed=1)
    config = TrainConfig(pretrained="")
    torch.manual_seed(0)
    model = recipe.build_model(config)
    checkpoint = f"{folder}/checkpoint"
    runs.write_state(
        checkpoint,
        {"model": model.state_dict(), "config": config.to_dict(), "epoch": 0, "metrics": {}},
    )
    return checkpoint, str(data / "train_images")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["bare", "ray"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--checkpoint")
    parser.add_argument("--images")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--synthetic", type=int, default=0, help="ray: N synthetic images")
    parser.add_argument("--json", default="", help="a results file name (benchmarks/results/)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="steelseg-bench-predict-") as folder:
        if args.mode == "ray" and args.synthetic:
            args.checkpoint, args.images = synthetic_checkpoint(
                folder, args.synthetic, args.height, args.width
            )
        rows = []
        for tta in (False, True):
            if args.mode == "bare":
                device = torch.device(args.device)
                result = bare(device, args.batch, args.batches, tta, args.height, args.width)
            else:
                result = with_ray(args.checkpoint, args.images, args.batch, args.actors, tta)
            print(json.dumps(result), flush=True)
            rows.append(result)
    if args.json:
        record(rows, args.json)


if __name__ == "__main__":
    main()
