"""ONNX Runtime against PyTorch on this CPU: images/s of the exported model at 256x1600 (the
network, presence gate and sigmoid: what ``steelseg export`` puts in the file), batch 1 and 8,
against predict's forward in PyTorch in float32 (the file's precision) and in the precision
predict runs here (bf16 where the CPU has it). Untrained networks, as timing needs no training.

    python benchmarks/bench_export.py --arch paper,unet-resnet18 --batches 1,8 \
        --json export_256x1600_cpu2.json

Both runtimes get the same threads (``--threads``, default every core). A row's time is the
mean over ``--repeats`` calls after one warm-up call, inputs already normalised and in memory.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import record, table

from steelseg import runs
from steelseg.config import TrainConfig
from steelseg.inference.export import export_onnx
from steelseg.inference.predict import prepare
from steelseg.model import inputs
from steelseg.training.recipe import build_model

H, W = 256, 1600


def timed(call, repeats: int) -> float:
    """Seconds a call, the mean of ``repeats`` after a warm-up."""
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def measure(arch: str, batches: list[int], repeats: int, threads: int, folder: Path) -> list:
    import onnxruntime as ort

    config = TrainConfig(arch=arch)
    torch.manual_seed(0)
    state = {"model": build_model(config).state_dict(), "config": config.to_dict()}
    runs.write_state(folder / arch / "epoch_0001", {**state, "epoch": 1, "metrics": {}})
    out = folder / f"{arch}.onnx"
    export_onnx(folder / arch, out)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    model, _, _ = runs.load_checkpoint(folder / arch / "epoch_0001")
    rows = []
    for batch in batches:
        images = np.random.default_rng(0).integers(0, 255, (batch, H, W, 3), dtype=np.uint8)
        masks = torch.zeros(images.shape[:3], dtype=torch.uint8)
        x, _ = inputs.to_inputs({"image": torch.from_numpy(images), "mask": masks}, cpu)
        feed = {"image": x.numpy()}
        found = {"onnxruntime fp32": timed(lambda f=feed: session.run(None, f), repeats)}
        for amp in (False, True):
            net = prepare(model, cpu, amp)
            view = x.contiguous(memory_format=torch.channels_last) if (
                inputs.prefers_channels_last(cpu, amp)) else x  # fmt: skip

            def forward(net=net, view=view, amp=amp):
                with torch.no_grad(), inputs.autocast(cpu, amp):
                    return torch.sigmoid(net(view).float())

            precision = "bf16" if inputs.autocast_dtype(cpu, amp) else "fp32"
            found[f"pytorch {precision}"] = timed(forward, repeats)
        for runtime, seconds in found.items():
            rows.append({"arch": arch, "batch": batch, "runtime": runtime,
                         "s_per_batch": seconds, "img_per_s": batch / seconds})  # fmt: skip
            print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="paper,unet-resnet18")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per row (2)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="results file (a bare name goes to benchmarks/results/)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch.split(","):
            batches = [int(b) for b in args.batches.split(",")]
            rows += measure(arch, batches, args.repeats, args.threads, Path(tmp))
    print(table(rows, ["arch", "batch", "runtime", "s_per_batch", "img_per_s"]))
    if args.json:
        import onnxruntime

        record(rows, args.json, threads=args.threads, size=f"{H}x{W}",
               onnxruntime=onnxruntime.__version__, load_average=os.getloadavg())  # fmt: skip


if __name__ == "__main__":
    main()
