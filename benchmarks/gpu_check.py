"""The paths a Ray Train worker takes on a GPU, checked with torch alone (no Ray: a lent GPU
machine has torch but not Ray): build a rank's training through ``steelseg.training.recipe``,
train a few steps of synthetic batches with the worker's epoch function (bf16 autocast and
channels_last where the worker would use them), save a checkpoint through ``steelseg.runs``,
restore it into a fresh model and optimizer with the worker's restore, train on, and predict one
image through the inference path. One line per phase; exit status 1 on any error.

    python benchmarks/gpu_check.py                      # CUDA
    python benchmarks/gpu_check.py --device cpu         # the same on the CPU (the test suite)
"""

import argparse
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

from steelseg import runs
from steelseg.config import TrainConfig
from steelseg.inference.predict import prepare, probabilities
from steelseg.model.inputs import autocast_dtype, prefers_channels_last
from steelseg.training import epoch, recipe


def batches(n: int, batch: int, height: int, width: int, seed: int) -> list[dict]:
    """uint8 images and class bits as the data pipeline delivers them: a bright class-3 bar."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = rng.integers(90, 130, (batch, height, width, 3), dtype=np.uint8)
        mask = np.zeros((batch, height, width), np.uint8)
        mask[:, height // 4 : height // 2, width // 4 : width // 2] = 1 << 2
        image[mask > 0] = 220
        out.append({"image": torch.from_numpy(image), "mask": torch.from_numpy(mask)})
    return out


def train(training: recipe.Training, data: list, config: TrainConfig, device, amp: bool) -> float:
    totals = epoch.train_one_epoch(
        training.model,
        data,
        recipe.build_loss(config).to(device),
        training.optimizer,
        training.scheduler,
        device,
        amp=amp,
        channels_last=prefers_channels_last(device, amp),
    )
    if totals.first_nonfinite_batch >= 0:
        raise RuntimeError(f"non-finite loss at batch {totals.first_nonfinite_batch + 1}")
    return totals.loss_sum / totals.images


def state_of(training: recipe.Training, config: TrainConfig, epochs: int) -> dict:
    return {
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "scaler": None,
        "epoch": epochs,
        "global_step": training.scheduler.last_epoch,
        "optimizer_steps": training.scheduler.last_epoch,
        "config": config.to_dict(),
        "metrics": {},
    }


def check(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    height, width = (int(v) for v in args.size.split("x"))
    config = TrainConfig(arch=args.arch, epochs=2, batch_size=args.batch, warmup_steps=1)
    amp = autocast_dtype(device, config.amp) is not None  # the worker's rule
    layout = prefers_channels_last(device, amp)
    data = batches(args.steps, args.batch, height, width, seed=0)

    def phase(name: str, started: float, detail: str = "") -> None:
        print(f"{name:<10} ok  {time.perf_counter() - started:6.2f} s  {detail}", flush=True)

    started = time.perf_counter()
    training = recipe.build_training(config, device, args.steps, channels_last=layout)
    phase("build", started, f"{args.arch} on {device}, bf16 {amp}, channels_last {layout}")

    started = time.perf_counter()
    loss = train(training, data, config, device, amp)
    phase("train", started, f"{args.steps} steps of {args.batch} at {args.size}, loss {loss:.4f}")

    with tempfile.TemporaryDirectory(prefix="steelseg-gpu-check-") as folder:
        started = time.perf_counter()
        runs.write_state(folder, state_of(training, config, epochs=1))
        phase("save", started, folder)

        started = time.perf_counter()
        restored = recipe.build_training(
            config, device, args.steps, channels_last=layout, state=runs.read_state(folder)
        )
        placed = {
            value.device.type
            for group in restored.optimizer.state.values()
            for key, value in group.items()
            if key != "step"
        }
        if placed != {device.type}:
            raise RuntimeError(f"optimizer state on {placed}, the model on {device.type}")
        phase("restore", started, f"epoch {restored.epoch}, optimizer state on {device.type}")

        started = time.perf_counter()
        loss = train(restored, data, config, device, amp)
        phase("train", started, f"{args.steps} more steps after the restore, loss {loss:.4f}")

        started = time.perf_counter()
        model, _, _ = runs.load_checkpoint(folder)
        image = data[0]["image"][:1].numpy()
        probs = probabilities(prepare(model, device), image, device)
        if not np.isfinite(probs).all():
            raise RuntimeError("non-finite probabilities")
        phase("predict", started, f"probabilities {tuple(probs.shape)}, max {probs.max():.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--arch", default="paper", help="the network (default: paper)")
    parser.add_argument("--size", default="256x1600", help="HEIGHTxWIDTH (default 256x1600)")
    parser.add_argument("--batch", type=int, default=8, help="images a step (default 8)")
    parser.add_argument("--steps", type=int, default=4, help="steps a phase (default 4)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA device (try --device cpu)", file=sys.stderr)
        return 1
    try:
        check(args)
    except Exception:
        traceback.print_exc()
        print("gpu_check: FAILED", file=sys.stderr)
        return 1
    print("gpu_check: all phases ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
