"""The Ray Train worker loop, in named phases: set up and restore -> train an epoch -> validate ->
epoch metrics -> save. Every rank runs it; only rank 0 writes TensorBoard logs, the history and
checkpoint files, and every rank calls ``ray.train.report`` once per epoch.

Each rank reads its share of the training split through Ray Data, every epoch of the run from one
dataset, each epoch's share seeded by the epoch, and its share of the validation split in its own
process (``steelseg.data.pipeline``). A run whose
loss becomes NaN or infinite stops at the end of that epoch, all ranks together (they see the
all-reduced loss), without a checkpoint, and reports where (``diverged``).
"""

import contextlib
import math
import os
import resource
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from steelseg import runs
from steelseg.config import TrainConfig
from steelseg.data import pipeline
from steelseg.evaluation.metrics import DiceCounts
from steelseg.model.inputs import autocast_dtype, prefers_channels_last
from steelseg.training import progress, recipe
from steelseg.training.epoch import (
    EpochTotals,
    broadcast_buffers,
    train_one_epoch,
    validate_one_epoch,
)
from steelseg.training.tensorboard import EpochLog, log_epoch

LOSS_STEP_EVERY = 10  # train/loss_step in TensorBoard every this many steps

UPLOAD_MODES = {
    "async": ray.train.CheckpointUploadMode.ASYNC,
    "sync": ray.train.CheckpointUploadMode.SYNC,
}


def train_loop_per_worker(loop_config: dict) -> None:
    """The function Ray Train runs on every worker (``TorchTrainer``'s ``train_loop_per_worker``).

    ``loop_config``: ``config`` (a ``TrainConfig`` as a dict), ``train_table`` and
    ``val_table`` (the split's catalog rows; the training rows oversampled as an epoch sees
    them), ``grey`` (read the visible images as one channel) and ``progress``, the driver's
    queue or None.
    """
    Worker(loop_config).run()


class Worker:
    """One rank's state across epochs."""

    def __init__(self, loop_config: dict):
        self.config = config = TrainConfig.from_dict(loop_config["config"])
        # located once: for a bucket, each lookup builds a filesystem (and may resolve a region)
        self.run_dir = config.run_dir
        self.train_table, self.val_table = loop_config["train_table"], loop_config["val_table"]
        self.grey = loop_config.get("grey", False)
        context = ray.train.get_context()
        # this attempt's: an elastic run may restart with fewer or more workers
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        images = len(self.train_table)
        self.batches = recipe.batches_per_epoch(images, self.world, config.batch_size)
        self.steps = recipe.steps_per_epoch(
            images, self.world, config.batch_size, config.grad_accum
        )
        # the pipeline's imports in Ray's idle processes while this one builds the model
        self.data_cpus = data_cpus(config, context.get_local_world_size())
        pipeline.warm_up(config, self.data_cpus)
        self.device = ray.train.torch.get_device()
        self.pin = self.device.type == "cuda"  # batches in pinned memory, copied while computing
        self.amp = autocast_dtype(self.device, config.amp) is not None
        self.channels_last = prefers_channels_last(self.device, self.amp)
        self.sender = progress.Sender(loop_config.get("progress") if self.rank == 0 else None)
        self.training = recipe.build_training(
            config,
            self.device,
            self.steps,
            channels_last=self.channels_last,
            world_size=self.world,
            state=latest_state(),
        )
        self.start_epoch = self.training.epoch
        self.loss_fn = recipe.build_loss(config).to(self.device)
        self.model = ray.train.torch.prepare_model(self.training.model)
        self.log = None
        if self.rank == 0:
            self.log = EpochLog(runs.tensorboard_dir(self.run_dir), self.training.global_step)
            runs.trim_history(self.run_dir, self.start_epoch)
        pipeline.ordered_context()
        self.nodes, self.pids = gather_workers()

    def run(self) -> None:
        epochs = self._epochs()
        if epochs:  # none: a resume of a run that reached --max-steps or its last epoch
            self._run_epochs(epochs)
        if self.log:
            self.log.close()

    def _run_epochs(self, epochs: dict[int, np.ndarray]) -> None:
        """Train, validate and save each of ``epochs``, all read from one training dataset."""
        config = self.config
        dataset = pipeline.train_dataset(
            self.train_table, epochs, config, self.grey, self.data_cpus
        )
        blocks = iter(dataset.iter_torch_batches(batch_size=None, pin_memory=self.pin))
        # closed at the run's end: a run that stops early (divergence) stops its decoding
        with contextlib.closing(blocks):  # type: ignore[type-var]
            for epoch, places in epochs.items():
                started = time.perf_counter()
                batches = pipeline.epoch_batches(blocks, len(places), config.batch_size, epoch)
                totals, data_wait = self._train_epoch(epoch, batches)
                validating = time.perf_counter()
                val_sum, val_n, counts, samples = self._validate_epoch()
                times = {
                    "data_wait": data_wait,
                    "step": validating - started - data_wait,
                    "validate": time.perf_counter() - validating,
                }
                metrics = self._epoch_metrics(epoch, totals, [val_sum, val_n], counts, times)
                self._save(epoch, metrics, samples)
                if "diverged" in metrics or self._steps_left() == 0:
                    break

    def _epochs(self) -> dict[int, np.ndarray]:
        """Each epoch this attempt trains, with the places in the training table of the rows
        this rank reads in it (``pipeline.train_samples``), those past ``max_steps`` left out:
        every rank stops at the same batch, as they step together."""
        config, epochs, left = self.config, {}, self._steps_left()
        images = len(self.train_table)
        for epoch in range(self.start_epoch, config.epochs):
            if left == 0:
                break
            places = pipeline.train_samples(images, config.seed, epoch, self.rank, self.world)
            if left is not None:
                places = places[: left * config.grad_accum * config.batch_size]
                left = max(0, left - self.steps)
            epochs[epoch] = places
        return epochs

    def _steps_left(self) -> int | None:
        """Optimizer steps left before ``max_steps`` (None: no limit)."""
        if not self.config.max_steps:
            return None
        return max(0, self.config.max_steps - self.training.optimizer_steps)

    def _train_epoch(self, epoch: int, batches: Iterable) -> tuple[EpochTotals, float]:
        """The epoch's totals and the seconds spent waiting for ``batches``."""
        config, training = self.config, self.training
        waited = Waited(batches)
        first_step, first_schedule_step = training.global_step, training.scheduler.last_epoch

        def on_step(i: int, loss: torch.Tensor, n: int) -> None:
            # reading the loss waits for the GPU: only every LOSS_STEP_EVERY steps
            if self.log and (first_step + i) % LOSS_STEP_EVERY == 0:
                self.log.writer.add_scalar("train/loss_step", loss.item(), first_step + i)
            self.sender.step(epoch + 1, i + 1, self.batches, loss)

        totals = train_one_epoch(
            self.model,
            waited,
            self.loss_fn,
            training.optimizer,
            training.scheduler,
            self.device,
            amp=self.amp,
            channels_last=self.channels_last,
            grad_accum=config.grad_accum,
            on_step=on_step,
            grey=self.grey,
        )
        training.global_step += -(-totals.images // config.batch_size)
        training.optimizer_steps += training.scheduler.last_epoch - first_schedule_step
        return totals, waited.seconds

    def _validate_epoch(self) -> tuple[float, int, DiceCounts, list]:
        """Every validation image once over the ranks, each rank with rank 0's model: the
        weights are the same on every rank (DDP), and the BatchNorm statistics, which each
        rank's training forward updated on its own batches, are taken from rank 0, whose are
        saved in the checkpoint."""
        model = self.training.model
        broadcast_buffers(model)
        rows = pipeline.val_rows(self.val_table, self.rank, self.world)
        return validate_one_epoch(
            model,
            pipeline.val_batches(rows, self.config, self.grey, self.pin),
            self.loss_fn,
            self.device,
            threshold=self.config.threshold,
            amp=self.amp,
            channels_last=self.channels_last,
            keep=self.config.log_images if self.rank == 0 else 0,
            grey=self.grey,
        )

    def _epoch_metrics(
        self,
        epoch: int,
        totals: EpochTotals,
        val_sums: list[float],
        counts: DiceCounts,
        times: dict[str, float],
    ) -> dict:
        """The epoch's metrics over all ranks: losses and Dice from summed counts, the phases'
        seconds of the slowest rank, and where the loss first stopped being finite, if it
        did."""
        counts.all_reduce()
        sums = [totals.loss_sum, totals.images, *val_sums]
        train_sum, train_n, val_sum, val_n = all_reduce_sums(sums, self.device)
        # the training pass of the slowest rank: the max of each rank's own sum
        *slowest, train_seconds = all_reduce_max(
            [*times.values(), times["data_wait"] + times["step"]], self.device
        )
        training = self.training
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": train_sum / max(train_n, 1),
            "val_loss": val_sum / max(val_n, 1),
            "train_images": int(train_n),
            "val_images": int(val_n),
            "lr": training.scheduler.get_last_lr()[0],
            "optimizer_steps": training.optimizer_steps,
            "resumed_from_epoch": self.start_epoch,  # 0 unless this attempt restored a checkpoint
            "images_per_s": train_n / train_seconds,  # training pass, all workers
            "nodes": self.nodes,
            "worker_pids": self.pids,
            **peak_memory(self.device),
            **{f"time_{phase}_s": value for phase, value in zip(times, slowest)},
            **counts.compute().as_dict("val_"),
        }
        reason = self._divergence(epoch, train_sum, totals)
        if reason:
            # no score: a model of NaN weights predicts nothing, which scores the all-empty
            # baseline and would rank the epoch among the good ones
            metrics = {k: math.nan if k.startswith("val_") else v for k, v in metrics.items()}
            metrics["diverged"] = reason
        return metrics

    def _divergence(self, epoch: int, train_sum: float, totals: EpochTotals) -> str:
        """Why the run cannot go on ('' if it can), the same on every rank: from the all-reduced
        loss and an all-reduced check of every weight and statistic."""
        (finite,) = all_reduce_min([float(finite_state(self.training.model))], self.device)
        if math.isfinite(train_sum) and finite:
            return ""
        (first,) = all_reduce_min(
            [totals.first_nonfinite_batch if totals.first_nonfinite_batch >= 0 else math.inf],
            self.device,
        )
        where = f"epoch {epoch + 1}"
        if math.isfinite(first):
            where += f", batch {int(first) + 1} of {self.batches}"
        what = "training loss" if not math.isfinite(train_sum) else "weights"
        return f"the {what} became NaN or infinite in {where}"

    def _save(self, epoch: int, metrics: dict, samples: list) -> None:
        """Rank 0 writes the checkpoint (none for an epoch whose loss diverged) and logs the
        epoch; every rank reports."""
        if self.rank != 0:
            ray.train.report(metrics)
            return
        assert self.log is not None  # rank 0's
        training, kept = self.training, "diverged" not in metrics
        # staged in a local folder that Ray deletes once it is in storage; with async upload
        # the next epoch trains meanwhile (a checkpoint holds ~200 MB)
        started = time.perf_counter()
        folder = tempfile.mkdtemp(prefix="steelseg-ckpt-")
        if kept:
            runs.write_state(
                folder,
                {
                    "model": training.model.state_dict(),
                    "optimizer": training.optimizer.state_dict(),
                    "scheduler": training.scheduler.state_dict(),
                    "scaler": None,  # bf16 autocast needs no GradScaler
                    "epoch": epoch + 1,
                    "global_step": training.global_step,
                    "optimizer_steps": training.optimizer_steps,
                    "config": self.config.to_dict(),
                    "metrics": metrics,
                },
            )
        writer = self.log.writer
        writer.add_scalar("time/checkpoint", time.perf_counter() - started, training.global_step)
        log_epoch(writer, metrics, samples, training.global_step)
        self.log.end_epoch()
        runs.append_history(self.run_dir, metrics)
        self.sender.epoch(metrics)
        if not kept:
            os.rmdir(folder)
            ray.train.report(metrics)
            return
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=runs.checkpoint_name(epoch + 1),
            checkpoint_upload_mode=UPLOAD_MODES[self.config.checkpoint_upload],
            delete_local_checkpoint_after_upload=True,
        )


def finite_state(model: torch.nn.Module) -> bool:
    """Whether every weight and statistic (BatchNorm's running means too) is finite: one read
    of the device an epoch."""
    values = [v for v in model.state_dict().values() if v.is_floating_point()]
    return bool(torch.stack([torch.isfinite(v).all() for v in values]).all())


def latest_state() -> dict | None:
    """The whole state of this run's latest checkpoint (``runs.read_state``), None at the
    start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return runs.read_state(folder)


class Waited:
    """Batches, adding up the seconds spent waiting for each (the data pipeline's share of
    the epoch; the rest is the step's)."""

    def __init__(self, batches: Iterable):
        self.batches = batches
        self.seconds = 0.0

    def __iter__(self) -> Iterator:
        batches = iter(self.batches)
        while True:
            started = time.perf_counter()
            batch = next(batches, None)
            self.seconds += time.perf_counter() - started
            if batch is None:
                return
            yield batch


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    return _all_reduce(values, device, "SUM")


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    return _all_reduce(values, device, "MAX")


def all_reduce_min(values: list[float], device: torch.device) -> list[float]:
    return _all_reduce(values, device, "MIN")


def _all_reduce(values: list[float], device: torch.device, op: str) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.tolist()


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak resident memory of the worker processes (and GPU memory), the largest over ranks."""
    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20]
    if device.type == "cuda":
        peaks.append(torch.cuda.max_memory_allocated(device) / 2**30)
    names = ["peak_worker_rss_gib", "peak_gpu_memory_gib"]
    return dict(zip(names, all_reduce_max(peaks, device)))


def data_cpus(config: TrainConfig, ranks_here: int) -> int:
    """The CPUs of this node that its Train workers leave to Ray Data, this rank's share (at
    least 1)."""
    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["NodeID"] == node), 0)
    return max(1, int((cpus - ranks_here * config.cpus_per_worker) / max(1, ranks_here)))


def gather_workers() -> tuple[int, list[int]]:
    """Distinct nodes among the ranks and each rank's process id (every rank takes part)."""
    me = (ray.get_runtime_context().get_node_id(), os.getpid())
    if not (dist.is_available() and dist.is_initialized()):
        return 1, [me[1]]
    workers: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(workers, me)
    return len({node for node, _ in workers}), [pid for _, pid in workers]
