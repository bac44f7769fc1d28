"""Training throughput: the bare training step in its variants, and a Ray Train run against it.

    python benchmarks/bench_train.py bare --height 256 --width 1600 --batch 8,16   # GPU or CPU
    python benchmarks/bench_train.py bare --height 64 --width 320 --threads 1,2    # CPU
    python benchmarks/bench_train.py bare --arch paper,unet-resnet18 \
        --variants fp32+channels_last,bf16+channels_last                          # fp32 vs bf16
    python benchmarks/bench_train.py ray --height 32 --width 160 --workers 1,2      # needs Ray
    python benchmarks/bench_train.py ray --workers 1 --precision fp32,bf16          # fp32 vs bf16
    python benchmarks/bench_train.py ray --workers 2 --two-nodes                    # 2 nodes here

``bare`` times ``steelseg.training.epoch.train_one_epoch`` on in-memory uint8 batches (no data
loading) for each variant (``--variants``; on a GPU by default bf16 autocast with and without
channels_last, fused AdamW, ``torch.compile`` in its default, max-autotune and CUDA-graph modes,
and fp32; on a CPU fp32 with and without channels_last, and bf16 autocast + channels_last where
the CPU has bf16 instructions) and network (``--arch``), and prints images/s, peak memory, the
FLOPs of one step counted by ``torch.utils.flop_counter`` (convolutions and matmuls, forward and
backward), the TFLOP/s they make and the model FLOP utilisation against a large matmul timed in
the same run in the same precision. A variant that fails (a compile mode on this machine) is
reported as failed and the others still run. Each row says the precision that ran
(``steelseg.model.inputs.autocast_dtype``: a bf16 variant on a CPU without bf16 runs float32).
``ray`` runs ``steelseg.training.fit.fit`` on a synthetic set with 1 and 2 workers of 1 CPU, for
each network and precision (``--precision``: config.amp off and on), and compares the images/s
per worker (epochs after the first) with the bare step on 1 thread in the same precision and
layout, with where a step's time goes (the worker loop's timers: waiting for Ray Data, the step
with DDP's all-reduce). Each writes JSON (``--json``) with date, machine, versions and command."""

import argparse
import itertools
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from common import machine, record, table

from steelseg.config import TrainConfig
from steelseg.model.inputs import autocast_dtype, cpu_runs_bf16, prefers_channels_last
from steelseg.runs import read_history
from steelseg.training import epoch, recipe


def synthetic_batches(n, batch, height, width, seed=0):
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.integers(0, 255, (batch, height, width, 3), dtype=np.uint8))
    mask = torch.from_numpy((rng.random((batch, height, width)) < 0.05).astype(np.uint8) * 4)
    return [{"image": image, "mask": mask} for _ in range(n)]


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_flops(model, loss_fn, batch, device, amp, channels_last) -> int:
    """FLOPs of one forward + backward on ``batch``, counted, not estimated."""
    from torch.utils.flop_counter import FlopCounterMode

    from steelseg.model.inputs import autocast, forward_padded, to_inputs

    x, y = to_inputs(batch, device, channels_last=channels_last)
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


# what ``bare`` compares, by name: layout, precision, torch.compile mode and fused AdamW
VARIANTS = {
    "fp32": dict(amp=False, channels_last=False),
    "fp32+channels_last": dict(amp=False, channels_last=True),
    "bf16+channels_last": dict(amp=True, channels_last=True),
    "bf16": dict(amp=True, channels_last=False),
    "bf16+channels_last+fused": dict(amp=True, channels_last=True, fused=True),
    "bf16+channels_last+compile": dict(amp=True, channels_last=True, compile="default"),
    "bf16+channels_last+compile-max-autotune": dict(
        amp=True, channels_last=True, compile="max-autotune-no-cudagraphs"
    ),
    "bf16+channels_last+compile-cudagraphs": dict(
        amp=True, channels_last=True, compile="reduce-overhead", fused=True
    ),
    "fp32+compile": dict(amp=False, channels_last=False, compile="default"),
}
GPU_VARIANTS = [
    "bf16+channels_last",
    "bf16",
    "bf16+channels_last+fused",
    "bf16+channels_last+compile",
    "bf16+channels_last+compile-max-autotune",
    "bf16+channels_last+compile-cudagraphs",
    "fp32",
]
CPU_VARIANTS = ["fp32", "fp32+channels_last"] + (["bf16+channels_last"] if cpu_runs_bf16() else [])
PRECISIONS = {"fp32": False, "bf16": True}  # config.amp


def bare_step(
    height,
    width,
    batch,
    steps,
    device,
    *,
    amp=False,
    channels_last=False,
    compile=None,
    fused=False,
    threads=None,
    arch="paper",
):
    """One variant of the training step on in-memory batches: images/s, peak memory, FLOPs."""
    if threads:
        torch.set_num_threads(threads)
    config = TrainConfig(arch=arch)
    torch.manual_seed(0)
    bare = recipe.build_model(config).to(device)
    if channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    optimizer = recipe.build_optimizer(config, bare, fused=fused)
    scheduler = recipe.build_scheduler(config, optimizer, 10 * steps)
    loss_fn = recipe.build_loss(config).to(device)
    model = torch.compile(bare, mode=compile) if compile else bare
    gpu = device.type == "cuda"
    kwargs = dict(amp=amp, channels_last=channels_last)
    warm = synthetic_batches(3, batch, height, width)
    started = time.perf_counter()
    epoch.train_one_epoch(model, warm, loss_fn, optimizer, scheduler, device, **kwargs)
    if compile:  # the first steps compile (and, with CUDA graphs, record): not timed
        epoch.train_one_epoch(model, warm, loss_fn, optimizer, scheduler, device, **kwargs)
    warm_up_s = time.perf_counter() - started
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    batches = synthetic_batches(steps, batch, height, width)
    start = time.perf_counter()
    epoch.train_one_epoch(model, batches, loss_fn, optimizer, scheduler, device, **kwargs)
    if gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else peak_rss_gib()
    flops = step_flops(bare, loss_fn, warm[0], device, amp, channels_last)
    precision = autocast_dtype(device, amp) or torch.float32
    peak_rate = matmul_rate(device, precision, 8192 if gpu else 1024)
    achieved = flops * steps / seconds
    return {
        "precision": "bf16" if precision == torch.bfloat16 else "fp32",
        "images_per_s": steps * batch / seconds,
        "peak_gib": peak,
        "s_per_step": seconds / steps,
        "warm_up_s": warm_up_s,
        "gflop_per_image": flops / batch / 1e9,
        "achieved_tflops": achieved / 1e12,
        "matmul_tflops": peak_rate / 1e12,
        "mfu": achieved / peak_rate,
    }


def cmd_bare(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    variants = args.variants.split(",") if args.variants else GPU_VARIANTS if gpu else CPU_VARIANTS
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [0]
    batches = [int(b) for b in str(args.batch).split(",")]
    archs = args.arch.split(",")
    print(
        f"bare training step on {machine()}, torch {torch.__version__}, "
        f"{args.height}x{args.width}, {args.steps} steps a variant"
    )
    rows = []
    for arch, batch, thread_count, name in itertools.product(archs, batches, threads, variants):
        try:
            r = bare_step(
                args.height, args.width, batch, args.steps, device,
                threads=thread_count or None, arch=arch, **VARIANTS[name],
            )  # fmt: skip
        except Exception as error:  # a compile mode that fails here is a figure too
            print(f"  {arch} {name}: failed: {type(error).__name__}: {str(error)[:200]}")
            rows.append({"arch": arch, "variant": name, "batch": batch, "failed": str(error)[:500]})
            continue
        row = {
            "arch": arch,
            "variant": name,
            "size": f"{args.height}x{args.width}",
            "batch": batch,
            "threads": torch.get_num_threads(),
            **r,
        }
        rows.append(row)
        print(
            f"  {arch:14s} {name:40s} {r['precision']} batch {batch:3d} "
            f"threads {row['threads']:2d} {r['images_per_s']:8.2f} images/s  "
            f"{r['s_per_step'] * 1e3:8.1f} ms/step  "
            f"peak {'GPU' if gpu else 'RSS'} {r['peak_gib']:.2f} GiB  "
            f"{r['gflop_per_image']:.1f} GFLOP/image  {r['achieved_tflops']:.3f} "
            f"TFLOP/s of {r['matmul_tflops']:.3f} (matmul)  MFU {100 * r['mfu']:.1f}%",
            flush=True,
        )
    if args.json:
        record(rows, args.json)


def ray_run(args, workers: int, tmp: str, data, arch: str, precision: str) -> dict:
    """A Ray Train run (``fit``) of ``workers`` x 1 CPU; its epochs after the first, averaged."""
    import ray

    from steelseg.training.fit import fit

    config = TrainConfig(
        data=str(data),
        storage=f"{tmp}/runs",
        name=f"bench-{arch}-{precision}-{workers}",  # a new run each, never a resume
        arch=arch,
        amp=PRECISIONS[precision],
        epochs=args.epochs,
        num_workers=workers,
        batch_size=args.batch,
        cpus_per_worker=1.0,
        log_images=0,
        placement_strategy="SPREAD" if args.two_nodes else "PACK",
    )
    result = fit(config)
    if result.error:
        raise SystemExit(f"the Ray Train run failed: {result.error}")
    history = read_history(result.run_dir).iloc[1:]  # the first epoch starts the processes
    ray.shutdown()
    batches = -(-int(history["train_images"].iloc[0]) // (workers * args.batch))
    return {
        "arch": arch,
        "precision": precision,
        "workers": workers,
        "nodes": int(history["nodes"].iloc[-1]),
        "images_per_s_per_worker": float(history["images_per_s"].mean()) / workers,
        "data_wait_ms_per_step": 1e3 * float(history["time_data_wait_s"].mean()) / batches,
        "step_ms": 1e3 * float(history["time_step_s"].mean()) / batches,
        "validate_s": float(history["time_validate_s"].mean()),
        "peak_worker_rss_gib": float(history["peak_worker_rss_gib"].max()),
    }


def cmd_ray(args):
    from steelseg.data import synth

    cluster = start_two_nodes() if args.two_nodes else None
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = synth.write_dataset(
                f"{tmp}/data", args.images, height=args.height, width=args.width, seed=0
            )
            runs = itertools.product(
                args.arch.split(","), args.precision.split(","), args.workers.split(",")
            )
            for arch, precision, workers in runs:
                rows.append(ray_run(args, int(workers), tmp, data, arch, precision))
    finally:
        if cluster:
            cluster.shutdown()
            shutil.rmtree(cluster.folder, ignore_errors=True)
    cpu, bare = torch.device("cpu"), {}
    for row in rows:
        key = row["arch"], row["precision"]
        if key not in bare:  # the worker's step: its precision and its layout, on 1 thread
            amp = PRECISIONS[row["precision"]]
            bare[key] = bare_step(
                args.height, args.width, args.batch, args.steps, cpu, threads=1,
                arch=row["arch"], amp=amp, channels_last=prefers_channels_last(cpu, amp),
            )  # fmt: skip
        row["ran"] = bare[key]["precision"]
        row["bare_images_per_s"] = bare[key]["images_per_s"]
        row["bare_step_ms"] = 1e3 * bare[key]["s_per_step"]
        row["overhead"] = 1 - row["images_per_s_per_worker"] / bare[key]["images_per_s"]
    print(
        f"Ray Train on {'two nodes' if cluster else 'this machine'}, workers x 1 CPU, "
        f"{args.height}x{args.width}, batch {args.batch} a worker, epochs 2..{args.epochs} "
        "(training pass; validation apart), against the bare step on 1 thread in the same "
        "precision and layout (ran: the precision this CPU runs for it):"
    )
    print(table(rows, list(rows[0])))
    if args.json:
        record(rows, args.json, two_nodes=bool(cluster), images=args.images)


def start_two_nodes():
    """The test suite's two-node cluster (``tests/raynodes.py``) on this machine: a head with 1
    CPU and a second node with 2, so that the two workers land on different nodes. Ended by its
    process tree if it fails to come up."""
    from pathlib import Path

    os.environ["RAY_AUTH_MODE"] = "token"  # read when Ray is imported
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from raynodes import LocalCluster

    folder = Path(tempfile.mkdtemp(prefix="steelseg-bench-nodes-"))
    cluster = LocalCluster(folder, cpus_per_node=1)
    try:
        cluster.start_head()
        cluster.wait_for_head()
        cluster.cpus = 2
        cluster.add_node()
        os.environ["RAY_ADDRESS"] = cluster.address
        ray.init(address=cluster.address, logging_level="ERROR")
        cluster.wait_for_nodes(2)
    except BaseException:
        cluster.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return cluster


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("bare", "ray"):
        p = sub.add_parser(name)
        p.add_argument("--height", type=int, default=32)
        p.add_argument("--width", type=int, default=160)
        p.add_argument("--steps", type=int, default=20)
        p.add_argument("--json", default="", help="a results file name (benchmarks/results/)")
        p.add_argument("--arch", default="paper", help="comma-separated networks (config arch)")
    bare, ray = sub.choices["bare"], sub.choices["ray"]
    bare.add_argument("--batch", default="8", help="comma-separated batch sizes")
    bare.add_argument("--threads", default="", help="comma-separated CPU thread counts")
    bare.add_argument("--variants", default="", help=f"comma-separated: {', '.join(VARIANTS)}")
    ray.add_argument("--batch", type=int, default=8)
    ray.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ray.add_argument("--images", type=int, default=200)
    ray.add_argument("--epochs", type=int, default=3)
    ray.add_argument("--two-nodes", action="store_true", help="on a two-node cluster started here")
    ray.add_argument(
        "--precision", default="bf16", help="comma-separated: fp32 (config amp off), bf16 (on)"
    )
    args = parser.parse_args()
    cmd_bare(args) if args.mode == "bare" else cmd_ray(args)


if __name__ == "__main__":
    main()
