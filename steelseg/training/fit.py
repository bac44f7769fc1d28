"""Distributed training on Ray: Ray Data feeds ``TorchTrainer`` workers that run DDP.

``fit(config)`` is the one entry point (the train command, tests and sweeps call it). It loads
and splits the data set, builds the pipelines and starts the trainer, whose workers run
``steelseg.training.loop``. A run lives in ``<storage>/<name>/`` (``steelseg.runs``); rerunning
with the same storage and name continues from the latest checkpoint.
"""

import contextlib
import logging
import math
import os
import posixpath
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from steelseg import runs
from steelseg.cluster import init_ray
from steelseg.config import TrainConfig
from steelseg.data import catalog, pipeline, synth
from steelseg.errors import SteelsegError
from steelseg.storage import Location, locate
from steelseg.training import progress
from steelseg.training.loop import train_loop_per_worker

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


def cpus_needed(config: TrainConfig) -> int:
    """CPUs for the workers and one more for the data pipeline."""
    return math.ceil(config.num_workers * config.cpus_per_worker) + 1


@dataclass
class FitResult:
    """What a training run ended with."""

    run_dir: Location
    metrics: dict = field(default_factory=dict)  # the last epoch's; empty if none finished
    best_checkpoint: Location | None = None  # the kept checkpoint with the best val Dice
    error: Exception | None = None  # why the run failed, None if it finished


def fit(
    config: TrainConfig,
    callbacks: list | None = None,
    *,
    on_progress: Callable[[tuple], None] | None = None,
    verbose: bool = False,
) -> FitResult:
    """Train (or resume) the run ``<storage>/<name>``.

    ``callbacks``: Ray Train callbacks, e.g. Tune's ``TuneReportCallback`` in a sweep's trial.
    ``on_progress``: called on this process with rank 0's progress events
    (``steelseg.training.progress``), e.g. a front end's display.
    ``verbose``: Ray's own logs and the workers' output too, when this call starts Ray.
    """
    config = config.resolved()
    train_table, val_table = load_split(config)
    runs.write_split(config.run_dir, train_table, val_table)
    init_ray(cpus_needed(config), verbose=verbose)
    relay = progress.Relay(on_progress) if on_progress else None
    with relay or contextlib.nullcontext():
        result = build_trainer(config, train_table, val_table, callbacks, relay).fit()
    best = result.get_best_checkpoint(runs.SCORE, "max") if result.best_checkpoints else None
    return FitResult(
        run_dir=config.run_dir,
        metrics=dict(result.metrics or {}),
        best_checkpoint=config.run_dir / posixpath.basename(best.path) if best else None,
        error=result.error,
    )


def build_trainer(
    config: TrainConfig,
    train_table: pd.DataFrame,
    val_table: pd.DataFrame,
    callbacks: list | None,
    relay: progress.Relay | None,
) -> TorchTrainer:
    storage = locate(config.storage_path, "storage")
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": config.to_dict(),
            "steps_per_epoch": steps_per_epoch(config, len(train_table)),
            "batches_per_epoch": batches_per_epoch(config, len(train_table)),
            "progress": relay.queue if relay else None,
        },
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker},
            placement_strategy=config.placement_strategy,
        ),
        run_config=RunConfig(
            name=config.name,
            storage_path=storage.path,
            storage_filesystem=None if storage.local else storage.fs,
            failure_config=FailureConfig(max_failures=config.max_failures),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=config.keep_checkpoints,
                checkpoint_score_attribute=runs.SCORE,
                checkpoint_score_order="max",
            ),
        ),
        datasets={
            "train": pipeline.train_dataset(train_table, config),
            "val": pipeline.val_dataset(val_table, config),
        },
    )
