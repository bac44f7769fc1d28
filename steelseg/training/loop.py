"""The Ray Train worker loop, in named phases: set up and restore -> train an epoch -> validate ->
epoch metrics -> save. Every rank runs it; only rank 0 writes TensorBoard logs, the history and
checkpoint files, and every rank calls ``ray.train.report`` once per epoch.
"""

import hashlib
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from steelseg import runs
from steelseg.config import TrainConfig
from steelseg.evaluation.figures import truth_vs_prediction
from steelseg.evaluation.metrics import DiceCounts
from steelseg.model.inputs import autocast_dtype, prefers_channels_last
from steelseg.training import progress, recipe
from steelseg.training.epoch import train_one_epoch, validate_one_epoch

LOSS_STEP_EVERY = 10  # train/loss_step in TensorBoard every this many steps

UPLOAD_MODES = {
    "async": ray.train.CheckpointUploadMode.ASYNC,
    "sync": ray.train.CheckpointUploadMode.SYNC,
}


def train_loop_per_worker(loop_config: dict) -> None:
    """The function Ray Train runs on every worker (``TorchTrainer``'s ``train_loop_per_worker``).

    ``loop_config``: ``config`` (a ``TrainConfig`` as a dict), ``train_images`` (the training
    split's size) and ``progress``, the driver's queue or None.
    """
    Worker(loop_config).run()


class Worker:
    """One rank's state across epochs."""

    def __init__(self, loop_config: dict):
        self.config = config = TrainConfig.from_dict(loop_config["config"])
        # located once: for a bucket, each lookup builds a filesystem (and may resolve a region)
        self.run_dir = config.run_dir
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        # this attempt's: an elastic run may restart with fewer or more workers
        world, images = context.get_world_size(), loop_config["train_images"]
        self.batches = recipe.batches_per_epoch(images, world, config.batch_size)
        self.steps = recipe.steps_per_epoch(images, world, config.batch_size, config.grad_accum)
        self.device = ray.train.torch.get_device()
        self.amp = autocast_dtype(self.device, config.amp) is not None
        self.channels_last = prefers_channels_last(self.device, self.amp)
        self.sender = progress.Sender(loop_config.get("progress") if self.rank == 0 else None)
        self.tensorboard_staging = ""
        self._set_up()
        self.optimizer_steps = 0  # since the run began, resumes included
        self.start_epoch, self.global_step = self._restore()
        self.model = ray.train.torch.prepare_model(self.bare)
        self.writer = self._tensorboard() if self.rank == 0 else None
        if self.rank == 0:
            runs.trim_history(self.run_dir, self.start_epoch)
        self.nodes, self.pids = gather_workers()

    def run(self) -> None:
        for epoch in range(self.start_epoch, self.config.epochs):
            started = time.perf_counter()
            train_sum, train_n, data_wait = self._train_epoch(epoch)
            validating = time.perf_counter()
            val_sum, val_n, counts, samples = self._validate_epoch()
            times = {
                "data_wait": data_wait,
                "step": validating - started - data_wait,
                "validate": time.perf_counter() - validating,
            }
            metrics = self._epoch_metrics(
                epoch, [train_sum, train_n, val_sum, val_n], counts, times
            )
            self._save(epoch, metrics, samples)
        if self.writer:
            self.writer.close()
        if self.tensorboard_staging:
            shutil.rmtree(self.tensorboard_staging, ignore_errors=True)

    def _set_up(self) -> None:
        config = self.config
        torch.manual_seed(config.seed)
        self.bare = recipe.build_model(config)
        if self.channels_last:  # before DDP wraps it: its gradient buckets take these strides
            self.bare = self.bare.to(memory_format=torch.channels_last)
        self.optimizer = recipe.build_optimizer(config, self.bare)
        self.scheduler = recipe.build_scheduler(config, self.optimizer, self.steps * config.epochs)
        self.loss_fn = recipe.build_loss(config).to(self.device)

    def _restore(self) -> tuple[int, int]:
        """Load the latest checkpoint of this run, if any; returns (next epoch, global step)."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0, 0
        with checkpoint.as_directory() as folder:
            state = runs.read_state(folder)
        self.bare.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # checkpoints are taken at the end of an epoch: the schedule goes on from the start of
        # the next one, in this attempt's steps (the same as the stored count unless the
        # number of workers changed)
        recipe.move_schedule(self.scheduler, state["epoch"] * self.steps)
        self.optimizer_steps = state.get("optimizer_steps", state["scheduler"]["last_epoch"])
        return state["epoch"], state["global_step"]

    def _train_epoch(self, epoch: int) -> tuple[float, int, float]:
        """(loss sum, images, seconds spent waiting for batches)."""
        config = self.config
        batches = Waited(
            ray.train.get_dataset_shard("train").iter_torch_batches(
                batch_size=config.batch_size, pin_memory=self.device.type == "cuda"
            )
        )
        first_step, first_schedule_step = self.global_step, self.scheduler.last_epoch

        def on_step(i: int, loss: torch.Tensor, n: int) -> None:
            # reading the loss waits for the GPU: only every LOSS_STEP_EVERY steps
            if self.writer and (first_step + i) % LOSS_STEP_EVERY == 0:
                self.writer.add_scalar("train/loss_step", loss.item(), first_step + i)
            self.sender.step(epoch + 1, i + 1, self.batches, loss)

        loss_sum, seen = train_one_epoch(
            self.model,
            batches,
            self.loss_fn,
            self.optimizer,
            self.scheduler,
            self.device,
            amp=self.amp,
            channels_last=self.channels_last,
            grad_accum=config.grad_accum,
            on_step=on_step,
        )
        self.global_step += -(-seen // config.batch_size)
        self.optimizer_steps += self.scheduler.last_epoch - first_schedule_step
        return loss_sum, seen, batches.seconds

    def _validate_epoch(self) -> tuple[float, int, DiceCounts, list]:
        batches = ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=self.config.batch_size, pin_memory=self.device.type == "cuda"
        )
        return validate_one_epoch(
            self.bare,
            batches,
            self.loss_fn,
            self.device,
            threshold=self.config.threshold,
            amp=self.amp,
            channels_last=self.channels_last,
            keep=self.config.log_images if self.rank == 0 else 0,
        )

    def _epoch_metrics(
        self, epoch: int, sums: list[float], counts: DiceCounts, times: dict[str, float]
    ) -> dict:
        """The epoch's metrics over all ranks: losses and Dice from summed counts, the phases'
        seconds of the slowest rank."""
        counts.all_reduce()
        train_sum, train_n, val_sum, val_n = all_reduce_sums(sums, self.device)
        # the training pass of the slowest rank: the max of each rank's own sum
        *slowest, train_seconds = all_reduce_max(
            [*times.values(), times["data_wait"] + times["step"]], self.device
        )
        return {
            "epoch": epoch + 1,
            "train_loss": train_sum / max(train_n, 1),
            "val_loss": val_sum / max(val_n, 1),
            "train_images": int(train_n),
            "val_images": int(val_n),
            "lr": self.scheduler.get_last_lr()[0],
            "optimizer_steps": self.optimizer_steps,
            "resumed_from_epoch": self.start_epoch,  # 0 unless this attempt restored a checkpoint
            "images_per_s": train_n / train_seconds,  # training pass, all workers
            "nodes": self.nodes,
            "worker_pids": self.pids,
            **peak_memory(self.device),
            **{f"time_{phase}_s": value for phase, value in zip(times, slowest)},
            **counts.compute().as_dict("val_"),
        }

    def _save(self, epoch: int, metrics: dict, samples: list) -> None:
        """Rank 0 writes the checkpoint and logs the epoch; every rank reports."""
        if self.rank != 0:
            ray.train.report(metrics)
            return
        # staged in a local folder that Ray deletes once it is in storage; with async upload
        # the next epoch trains meanwhile (a checkpoint holds ~200 MB)
        started = time.perf_counter()
        folder = tempfile.mkdtemp(prefix="steelseg-ckpt-")
        runs.write_state(
            folder,
            {
                "model": self.bare.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": None,  # bf16 autocast needs no GradScaler
                "epoch": epoch + 1,
                "global_step": self.global_step,
                "optimizer_steps": self.optimizer_steps,
                "config": self.config.to_dict(),
                "metrics": metrics,
            },
        )
        self.writer.add_scalar("time/checkpoint", time.perf_counter() - started, self.global_step)
        log_epoch(self.writer, metrics, samples, self.global_step)  # flushes
        if self.tensorboard_staging:  # the run's folder is in an object store
            runs.tensorboard_dir(self.run_dir).upload(self.tensorboard_staging)
        runs.append_history(self.run_dir, metrics)
        self.sender.epoch(metrics)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(folder),
            checkpoint_dir_name=runs.checkpoint_name(epoch + 1),
            checkpoint_upload_mode=UPLOAD_MODES[self.config.checkpoint_upload],
            delete_local_checkpoint_after_upload=True,
        )

    def _tensorboard(self):
        """The writer of rank 0: into the run's folder, or, when that is in an object store,
        into a local folder uploaded after every epoch."""
        from torch.utils.tensorboard import SummaryWriter

        folder = runs.tensorboard_dir(self.run_dir)
        if not folder.local:
            # one staging folder per run, which a restarted attempt reuses: an attempt that is
            # killed (a failed worker, a trial ASHA stops) cannot remove its own. It starts
            # empty: what an earlier attempt (or an earlier run of this name) staged is in the
            # bucket already, or past the checkpoint and purged; uploaded again, it would
            # repeat epochs
            key = hashlib.sha1(folder.uri.encode()).hexdigest()[:12]
            staging = Path(tempfile.gettempdir()) / f"steelseg-tensorboard-{key}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            self.tensorboard_staging = str(staging)
        # purge_step drops events a crashed attempt wrote past the checkpoint we resume from;
        # the checkpointed epoch's own curves were logged at its last step, so they stay
        purge = self.global_step + 1 if self.global_step else None
        return SummaryWriter(self.tensorboard_staging or folder.path, purge_step=purge)


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


def gather_workers() -> tuple[int, list[int]]:
    """Distinct nodes among the ranks and each rank's process id (every rank takes part)."""
    me = (ray.get_runtime_context().get_node_id(), os.getpid())
    if not (dist.is_available() and dist.is_initialized()):
        return 1, [me[1]]
    workers = [None] * dist.get_world_size()
    dist.all_gather_object(workers, me)
    return len({node for node, _ in workers}), [pid for _, pid in workers]


def log_epoch(writer, metrics: dict, samples: list, step: int) -> None:
    """Epoch-level curves on the same step axis as the per-step loss."""
    writer.add_scalar("loss/train", metrics["train_loss"], step)
    writer.add_scalar("loss/val", metrics["val_loss"], step)
    writer.add_scalar("lr", metrics["lr"], step)
    writer.add_scalar("epoch", metrics["epoch"], step)
    for phase in ("data_wait", "step", "validate"):
        writer.add_scalar(f"time/{phase}", metrics[f"time_{phase}_s"], step)
    for key, value in metrics.items():
        if key.startswith("val_") and key != "val_loss" and np.isfinite(value):
            writer.add_scalar(f"val/{key.removeprefix('val_')}", value, step)
    if samples:
        figure = truth_vs_prediction([(i.numpy(), t.numpy(), p.numpy()) for i, t, p in samples])
        writer.add_image("val/truth_vs_prediction", figure, step, dataformats="HWC")
    writer.flush()
