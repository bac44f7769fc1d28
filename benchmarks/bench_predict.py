"""Prediction throughput at the real size (256x1600): images/s with and without flip TTA, in
float32 and bf16, for each network.

    python benchmarks/bench_predict.py bare --device cuda --batch 16      # the model step alone
    python benchmarks/bench_predict.py ray --images DIR --checkpoint RUN  # Ray Data actors, CPU
    python benchmarks/bench_predict.py ray --synthetic 24 --actors 2      # a synthetic folder,
                                                                           # an untrained model
    python benchmarks/bench_predict.py bare --arch paper,unet-resnet18 --precision fp32,bf16

``bare`` times what a prediction actor does per batch (normalise, forward at full size, sigmoid,
TTA, post-process and RLE-encode the 4 masks of each image) on in-memory images, so it needs
neither Ray nor a trained checkpoint: a U-Net initialised as for training, whose head prior
predicts almost nothing, so the RLE strings are short, as on mostly clean steel.
``ray`` times ``steelseg.inference.predict.predict`` end to end (JPEG decode included) on a folder.
``--precision`` (bare, and ray on a synthetic folder) is the checkpoint's config.amp, off (fp32)
or on (bf16); a row's ``ran`` is the precision this device runs for it
(``steelseg.model.inputs.autocast_dtype``). A real ``--checkpoint`` runs in its own config's.
"""

import argparse
import itertools
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
from steelseg.model.inputs import autocast_dtype
from steelseg.runs import load_config
from steelseg.training import recipe

PRECISIONS = {"fp32": False, "bf16": True}  # config.amp


def ran(device: torch.device, amp: bool) -> str:
    return "bf16" if autocast_dtype(device, amp) == torch.bfloat16 else "fp32"


def bare(
    device: torch.device,
    batch: int,
    batches: int,
    tta: bool,
    height: int,
    width: int,
    arch: str = "paper",
    amp: bool = True,
):
    torch.manual_seed(0)
    model = prepare(recipe.build_model(TrainConfig(arch=arch)), device, amp)  # as an actor does
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (batch, height, width, 3), dtype=np.uint8)
    rules = Rules.plain(0.5)

    def run_batch():  # what Predictor.__call__ does after decoding
        masks, present = rules.apply_batch(probability_tensor(model, images, device, tta, amp))
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
        "arch": arch,
        "precision": "bf16" if amp else "fp32",
        "ran": ran(device, amp),
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
    config = load_config(checkpoint)
    return {"mode": "ray", "arch": config.arch, "precision": "bf16" if config.amp else "fp32",
            "ran": ran(torch.device("cpu"), config.amp), "images": n, "actors": actors,
            "batch": batch, "tta": tta, "seconds": round(seconds, 1),
            "images_per_s": round(n / seconds, 2)}  # fmt: skip


def synthetic_images(folder: str, images: int, height: int, width: int) -> str:
    """A synthetic image folder: what ``ray`` needs on a fresh clone."""
    from steelseg.data import synth

    data = synth.write_dataset(f"{folder}/data", images, height=height, width=width, seed=1)
    return str(data / "train_images")


def synthetic_checkpoint(folder: str, arch: str, amp: bool) -> str:
    """A checkpoint of an untrained model (the time does not depend on the weights) whose
    config has ``arch`` and ``amp``."""
    from steelseg import runs

    config = TrainConfig(pretrained="", arch=arch, amp=amp)
    torch.manual_seed(0)
    model = recipe.build_model(config)
    checkpoint = f"{folder}/checkpoint-{arch}-{'bf16' if amp else 'fp32'}"
    runs.write_state(
        checkpoint,
        {"model": model.state_dict(), "config": config.to_dict(), "epoch": 0, "metrics": {}},
    )
    return checkpoint


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
    parser.add_argument("--arch", default="paper", help="bare, synthetic: comma-separated")
    parser.add_argument(
        "--precision", default="bf16", help="bare, synthetic: comma-separated fp32 (amp off), bf16"
    )
    parser.add_argument("--tta", default="off,on", help="comma-separated: off, on")
    parser.add_argument("--json", default="", help="a results file name (benchmarks/results/)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ttas = [{"off": False, "on": True}[t] for t in args.tta.split(",")]
    kinds = list(itertools.product(args.arch.split(","), args.precision.split(",")))
    with tempfile.TemporaryDirectory(prefix="steelseg-bench-predict-") as folder:
        if args.mode == "ray" and args.synthetic:
            args.images = synthetic_images(folder, args.synthetic, args.height, args.width)
            checkpoints = [synthetic_checkpoint(folder, a, PRECISIONS[p]) for a, p in kinds]
        else:
            checkpoints = [args.checkpoint]
        rows = []
        runs = kinds if args.mode == "bare" else checkpoints
        for tta, run in itertools.product(ttas, runs):
            if args.mode == "bare":
                arch, precision = run
                result = bare(
                    torch.device(args.device), args.batch, args.batches, tta,
                    args.height, args.width, arch, PRECISIONS[precision],
                )  # fmt: skip
            else:
                result = with_ray(run, args.images, args.batch, args.actors, tta)
            print(json.dumps(result), flush=True)
            rows.append(result)
    if args.json:
        record(rows, args.json)


if __name__ == "__main__":
    main()
