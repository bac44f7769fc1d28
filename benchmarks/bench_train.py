"""Training throughput: the bare training step against a Ray Train run on the same machine and data,
and peak memory per worker.

    python benchmarks/bench_train.py bare --height 256 --width 512 --batch 16   # CPU or GPU
    python benchmarks/bench_train.py ray --height 32 --width 160 --workers 2    # needs Ray

``bare`` times ``steelseg.training.epoch.train_one_epoch`` on in-memory uint8 batches (no data
loading), with bf16 autocast + channels_last on GPU and fp32, and prints images/s, peak memory,
the FLOPs of one step counted by ``torch.utils.flop_counter`` (convolutions and matmuls, forward
and backward), the TFLOP/s they make and the model FLOP utilisation against a large matmul timed
in the same run in the same precision.
``ray`` runs ``steelseg.training.fit.fit`` on a synthetic set and compares its images/s per worker
(the last epochs, after warm-up) with the bare step run with the same threads per worker."""

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch

from steelseg.config import TrainConfig
from steelseg.runs import read_history
from steelseg.training import epoch, recipe


def synthetic_batches(n, batch, height, width, seed=0):
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.integers(0, 255, (batch, height, width, 3), dtype=np.uint8))
    mask = torch.from_numpy((rng.random((batch, height, width)) < 0.05).astype(np.uint8) * 4)
    return [{"image": image, "mask": mask} for _ in range(n)]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_flops(model, loss_fn, batch, device, amp) -> int:
    """FLOPs of one forward + backward on ``batch``, counted, not estimated."""
    from torch.utils.flop_counter import FlopCounterMode

    from steelseg.model.inputs import autocast, forward_padded, to_inputs

    x, y = to_inputs(batch, device, channels_last=amp and device.type == "cuda")
    with FlopCounterMode(display=False) as counter:
        with autocast(device, amp):
            logits = forward_padded(model, x)
        loss_fn(logits, y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_rate(device, dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of a square matmul, the chip's practical peak in this precision."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def bare_step(height, width, batch, steps, amp, device, threads=None):
    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig()
    model = recipe.build_model(config).to(device)
    if amp and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = recipe.build_optimizer(config, model)
    scheduler = recipe.build_scheduler(config, optimizer, 10 * steps)
    loss_fn = recipe.build_loss(config).to(device)
    warm = synthetic_batches(3, batch, height, width)
    epoch.train_one_epoch(model, warm, loss_fn, optimizer, scheduler, device, amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    batches = synthetic_batches(steps, batch, height, width)
    start = time.perf_counter()
    epoch.train_one_epoch(model, batches, loss_fn, optimizer, scheduler, device, amp=amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else peak_rss_gib()
    flops = step_flops(model, loss_fn, warm[0], device, amp)
    gpu = device.type == "cuda"
    peak_rate = matmul_rate(
        device, torch.bfloat16 if amp and gpu else torch.float32, 8192 if gpu else 1024
    )
    achieved = flops * steps / seconds
    return {
        "images_per_s": steps * batch / seconds,
        "peak_gib": peak,
        "s_per_step": seconds / steps,
        "gflop_per_image": flops / batch / 1e9,
        "achieved_tflops": achieved / 1e12,
        "matmul_tflops": peak_rate / 1e12,
        "mfu": achieved / peak_rate,
    }


def cmd_bare(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    print(
        f"bare training step on {name}, torch {torch.__version__}, "
        f"{args.height}x{args.width}, batch {args.batch}, {args.steps} steps"
    )
    rows = []
    for amp in [True, False] if device.type == "cuda" else [False]:
        r = bare_step(args.height, args.width, args.batch, args.steps, amp, device, args.threads)
        label = "bf16 autocast + channels_last" if amp else "fp32"
        rows.append({"precision": label, **r})
        print(
            f"  {label:30s} {r['images_per_s']:8.1f} images/s  {r['s_per_step'] * 1e3:7.1f} "
            f"ms/step  peak {'GPU' if device.type == 'cuda' else 'RSS'} {r['peak_gib']:.2f} GiB  "
            f"{r['gflop_per_image']:.1f} GFLOP/image  {r['achieved_tflops']:.3f} TFLOP/s of "
            f"{r['matmul_tflops']:.3f} (matmul)  MFU {100 * r['mfu']:.1f}%"
        )
    if args.json:
        record = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": name,
            "torch": torch.__version__,
            "command": "python " + " ".join(sys.argv),
            "rows": rows,
        }
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


def cmd_ray(args):
    import ray

    from steelseg.data import synth
    from steelseg.training.fit import fit

    with tempfile.TemporaryDirectory() as tmp:
        data = synth.write_dataset(
            f"{tmp}/data", args.images, height=args.height, width=args.width, seed=0
        )
        config = TrainConfig(
            data=str(data),
            storage=f"{tmp}/runs",
            name="bench",
            epochs=args.epochs,
            num_workers=args.workers,
            batch_size=args.batch,
            cpus_per_worker=1.0,
            log_images=0,
        )
        result = fit(config)
        per_epoch = read_history(result.run_dir)
        ray_rate = float(per_epoch["images_per_s"].iloc[1:].mean()) / args.workers
        peak = float(per_epoch["peak_worker_rss_gib"].max())
        ray.shutdown()
    bare = bare_step(
        args.height, args.width, args.batch, args.steps, False, torch.device("cpu"), threads=1
    )
    print(
        f"Ray Train, {args.workers} workers x 1 CPU, {args.height}x{args.width}, batch "
        f"{args.batch}/worker: {ray_rate:.2f} images/s per worker (epochs 2..{args.epochs}, "
        "train + data pipeline, validation excluded)"
    )
    print(f"bare step, 1 thread, same size and batch: {bare['images_per_s']:.2f} images/s")
    print(f"overhead: {100 * (1 - ray_rate / bare['images_per_s']):.1f}%")
    print(f"peak RSS per Ray Train worker: {peak:.2f} GiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("bare", "ray"):
        p = sub.add_parser(name)
        p.add_argument("--height", type=int, default=32)
        p.add_argument("--width", type=int, default=160)
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--json", default="")
    sub.choices["ray"].add_argument("--workers", type=int, default=2)
    sub.choices["ray"].add_argument("--images", type=int, default=200)
    sub.choices["ray"].add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    cmd_bare(args) if args.mode == "bare" else cmd_ray(args)


if __name__ == "__main__":
    main()
