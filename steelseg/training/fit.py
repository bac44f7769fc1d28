"""Distributed training on Ray: Ray Data feeds ``TorchTrainer`` workers that run DDP.

``fit(config)`` is the one entry point (``ray_jobs/train.py``, tests and Tune call it). It loads
and splits the data set, builds the pipelines and starts the trainer; ``train_loop_per_worker``
runs on every worker. Only rank 0 writes TensorBoard logs and checkpoint files; every rank calls
``ray.train.report`` once per epoch.

A run lives in ``<storage>/<name>/``: Ray's checkpoints (best K by val Dice, and the latest),
``tensorboard/``, ``history.jsonl`` (every epoch's metrics) and ``split.parquet`` (the catalog
with each image's split). Rerunning with
the same storage and name continues from the latest checkpoint.
"""

import contextlib
import logging
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from steelseg.cluster import init_ray
from steelseg.config import TrainConfig
from steelseg.data import catalog, pipeline, synth
from steelseg.errors import SteelsegError
from steelseg.evaluation.figures import truth_vs_prediction
from steelseg.runs import (
    CHECKPOINT_FILE,
    SCORE,
    append_history,
    trim_history,
)
from steelseg.training import engine, progress

log = logging.getLogger(__name__)


def demo_data(config: TrainConfig) -> Path:
    """The cached synthetic data set used when ``config.data`` is empty; made once."""
    cache = Path(os.path.expanduser(os.environ.get("STEELSEG_CACHE", "~/.cache/steelseg")))
    name = (
        f"demo-{config.synth_images}-{config.synth_height}x{config.synth_width}-seed{config.seed}"
        f"-{'-'.join(config.modalities)}"
    )
    folder = cache / name
    if (folder / "train.csv").exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        synth.write_dataset(
            Path(tmp) / "d",
            config.synth_images,
            height=config.synth_height,
            width=config.synth_width,
            seed=config.seed,
            modalities=config.modalities,
        )
        os.replace(Path(tmp) / "d", folder)
    return folder


def load_split(config: TrainConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    data = Path(config.data) if config.data else demo_data(config)
    table = catalog.load(
        data, modalities=config.modalities, drop_bad=config.drop_bad, report=log.warning
    )
    if len(table) < 2 * config.num_workers:
        raise SteelsegError(
            f"{data}: {len(table)} images are too few for {config.num_workers} workers"
        )
    return catalog.split(table, val_fraction=config.val_fraction, seed=config.seed)


def batches_per_epoch(config: TrainConfig, n_train: int) -> int:
    """Batches per epoch on every rank (Ray splits the rows equally)."""
    return math.ceil((n_train // config.num_workers) / config.batch_size)


def steps_per_epoch(config: TrainConfig, n_train: int) -> int:
    """Optimizer steps per epoch on every rank."""
    return math.ceil(batches_per_epoch(config, n_train) / config.grad_accum)


def save_split(run_dir: Path, train: pd.DataFrame, val: pd.DataFrame) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    table = pd.concat([train.assign(split="train"), val.assign(split="val")], ignore_index=True)
    catalog.save(table, run_dir / "split.parquet")


def cpus_needed(config: TrainConfig) -> int:
    """CPUs for the workers and one more for the data pipeline."""
    return math.ceil(config.num_workers * config.cpus_per_worker) + 1


def fit(
    config: TrainConfig,
    callbacks: list | None = None,
    *,
    show_progress: bool = True,
    verbose: bool = False,
) -> ray.train.Result:
    """Train (or resume) the run ``<storage>/<name>`` and return Ray's result.

    ``callbacks``: Ray Train callbacks, e.g. Tune's ``TuneReportCallback`` in a sweep's trial.
    ``show_progress``: print a line per epoch (and a bar on a terminal) on this process.
    ``verbose``: Ray's own logs and the workers' output too, when this call starts Ray.
    """
    config = config.resolved()
    train_table, val_table = load_split(config)
    save_split(config.run_dir, train_table, val_table)
    init_ray(cpus_needed(config), verbose=verbose)
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    printer = progress.Printer(config.epochs) if show_progress else None
    with printer or contextlib.nullcontext():
        return build_trainer(config, train_table, val_table, callbacks, printer).fit()


def build_trainer(
    config: TrainConfig,
    train_table: pd.DataFrame,
    val_table: pd.DataFrame,
    callbacks: list | None,
    printer: progress.Printer | None,
) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "steps_per_epoch": steps_per_epoch(config, len(train_table)),
            "batches_per_epoch": batches_per_epoch(config, len(train_table)),
            "progress": printer.queue if printer else None,
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},
            placement_strategy=config.placement_strategy,
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=config.storage_path,
            failure_config=FailureConfig(max_failures=config.max_failures),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                checkpoint_score_attribute=SCORE,
                checkpoint_score_order="max",
            ),
        ),
        datasets={
            "train": pipeline.train_dataset(train_table, config),
            "val": pipeline.val_dataset(val_table, config),
        },
    )


def train_loop_per_worker(loop_config: dict) -> None:
    config = TrainConfig.from_dict(loop_config["config"])
    steps, batches = loop_config["steps_per_epoch"], loop_config["batches_per_epoch"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    amp = config.amp and device.type == "cuda"

    torch.manual_seed(config.seed)
    model = engine.build_model(config)
    if amp:
        model = model.to(memory_format=torch.channels_last)
    optimizer = engine.build_optimizer(config, model)
    scheduler = engine.build_scheduler(config, optimizer, steps * config.epochs)
    start_epoch, global_step = restore(model, optimizer, scheduler)
    model = ray.train.torch.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    loss_fn = engine.build_loss(config).to(device)
    writer = tensorboard_writer(config, global_step) if rank == 0 else None
    if rank == 0:
        trim_history(config.run_dir, start_epoch)
    sender = progress.Sender(loop_config.get("progress") if rank == 0 else None)
    nodes, pids = gather_workers()

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()

        train_batches = ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=config.batch_size
        )
        train_sum, train_n = engine.train_one_epoch(
            model,
            train_batches,
            loss_fn,
            optimizer,
            scheduler,
            device,
            amp=amp,
            grad_accum=config.grad_accum,
            on_step=step_logger(writer, sender, epoch, batches, global_step),
        )
        train_seconds = time.perf_counter() - started
        global_step += math.ceil(train_n / config.batch_size)
        val_batches = ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=config.batch_size
        )
        val_sum, val_n, counts, samples = engine.evaluate(
            bare,
            val_batches,
            loss_fn,
            device,
            threshold=config.threshold,
            amp=amp,
            keep=config.log_images if rank == 0 else 0,
        )
        counts.all_reduce()
        sums = all_reduce_sums([train_sum, train_n, val_sum, val_n], device)
        metrics = {
            "epoch": epoch + 1,
            "train_loss": sums[0] / max(sums[1], 1),
            "val_loss": sums[2] / max(sums[3], 1),
            "train_images": int(sums[1]),
            "val_images": int(sums[3]),
            "lr": scheduler.get_last_lr()[0],
            "optimizer_steps": scheduler.last_epoch,  # since the run began, resumes included
            "resumed_from_epoch": start_epoch,  # 0 unless this attempt restored a checkpoint
            "images_per_s": sums[1] / train_seconds,  # training pass, all workers
            "nodes": nodes,
            "worker_pids": pids,
            **peak_memory(device),
            **counts.compute().as_dict("val_"),
        }
        state = None
        if rank == 0:
            log_epoch(writer, metrics, samples, global_step)
            append_history(config.run_dir, metrics)
            sender.epoch(metrics)
            state = {
                "model": bare.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": None,  # bf16 autocast needs no GradScaler
                "epoch": epoch + 1,
                "global_step": global_step,
                "config": config.to_dict(),
                "metrics": metrics,
            }
        with staged_checkpoint(state) as checkpoint:
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch + 1:04d}"
            )
    if writer:
        writer.close()


def step_logger(writer, sender: progress.Sender, epoch: int, batches: int, first_step: int):
    """The per-batch callback: train loss per step to TensorBoard, progress to the driver."""

    def on_step(i: int, loss: float, n: int) -> None:
        if writer:
            writer.add_scalar("train/loss_step", loss, first_step + i)
        sender.step(epoch + 1, i + 1, batches, loss)

    return on_step


def restore(model, optimizer, scheduler) -> tuple[int, int]:
    """Load the latest checkpoint of this run, if any; returns (next epoch, global step)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"], state["global_step"]


@contextlib.contextmanager
def staged_checkpoint(state: dict | None) -> Iterator[ray.train.Checkpoint | None]:
    """A checkpoint of ``state`` in a local folder that lives until the report has copied it
    to storage (a synchronous upload), then is deleted: a checkpoint holds ~200 MB."""
    if state is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="steelseg-ckpt-") as folder:
        torch.save(state, Path(folder) / CHECKPOINT_FILE)
        yield ray.train.Checkpoint.from_directory(folder)


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    sums = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    return sums.tolist()


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of the worker processes (and GPU memory), the largest over ranks."""
    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20]
    if device.type == "cuda":
        peaks.append(torch.cuda.max_memory_allocated(device) / 2**30)
    values = torch.tensor(peaks, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    names = ["peak_worker_rss_gib", "peak_gpu_memory_gib"]
    return dict(zip(names, values.tolist()))


def gather_workers() -> tuple[int, list[int]]:
    """Distinct nodes among the ranks and each rank's process id (every rank takes part)."""
    me = (ray.get_runtime_context().get_node_id(), os.getpid())
    if not (dist.is_available() and dist.is_initialized()):
        return 1, [me[1]]
    workers = [None] * dist.get_world_size()
    dist.all_gather_object(workers, me)
    return len({node for node, _ in workers}), [pid for _, pid in workers]


def tensorboard_writer(config: TrainConfig, global_step: int):
    from torch.utils.tensorboard import SummaryWriter

    # purge_step drops events a crashed attempt wrote past the checkpoint we resume from; the
    # checkpointed epoch's own curves were logged at its last step, so they stay
    purge = global_step + 1 if global_step else None
    return SummaryWriter(str(config.run_dir / "tensorboard"), purge_step=purge)


def log_epoch(writer, metrics: dict, samples: list, step: int) -> None:
    """Epoch-level curves on the same step axis as the per-step loss."""
    writer.add_scalar("loss/train", metrics["train_loss"], step)
    writer.add_scalar("loss/val", metrics["val_loss"], step)
    writer.add_scalar("lr", metrics["lr"], step)
    writer.add_scalar("epoch", metrics["epoch"], step)
    for key, value in metrics.items():
        if key.startswith("val_") and key != "val_loss" and np.isfinite(value):
            writer.add_scalar(f"val/{key.removeprefix('val_')}", value, step)
    if samples:
        figure = truth_vs_prediction([(i.numpy(), t.numpy(), p.numpy()) for i, t, p in samples])
        writer.add_image("val/truth_vs_prediction", figure, step, dataformats="HWC")
    writer.flush()


def report_result(result: ray.train.Result) -> int:
    """Print where the run is and what to run next; 0 if it finished, 1 if it failed."""
    if result.error:
        reason = " ".join(str(result.error).split())
        print(f"steelseg: error: training failed: {reason}", file=sys.stderr)
        return 1
    run_dir = Path(result.path)
    metrics = result.metrics or {}
    best = result.get_best_checkpoint(SCORE, "max") if result.best_checkpoints else None
    if metrics:
        print(
            f"finished epoch {metrics['epoch']}: val Dice {metrics[SCORE]:.4f} "
            f"(all-empty baseline {metrics['val_empty_baseline']:.4f})"
        )
    print(f"run:         {run_dir}")
    print(f"best:        {best.path if best else None} (best val Dice)")
    print("next:")
    print(f"  steelseg calibrate {run_dir}")
    print(f"  python ray_jobs/predict.py --checkpoint {run_dir} --images IMAGES --out sub.csv")
    print(f"  steelseg figures figures/ --run {run_dir}")
    print(f"  tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0
