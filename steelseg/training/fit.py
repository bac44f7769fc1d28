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
from steelseg.cluster import check_shared, init_ray, node_count
from steelseg.config import TrainConfig
from steelseg.data import catalog, pipeline, sampling, synth
from steelseg.errors import SteelsegError
from steelseg.storage import Location, locate
from steelseg.training import progress
from steelseg.training.loop import train_loop_per_worker

log = logging.getLogger(__name__)

INSPECT_CHUNK = 256  # images a Ray task checks


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


def data_folder(config: TrainConfig) -> Location:
    return locate(config.data or demo_data(config), "data")


def load_split(
    config: TrainConfig, inspect: catalog.Inspect = catalog.inspect_many
) -> tuple[pd.DataFrame, pd.DataFrame]:
    data = data_folder(config)
    table = catalog.load(
        data,
        modalities=config.modalities,
        drop_bad=config.drop_bad,
        report=log.warning,
        inspect=inspect,
    )
    if note := catalog.nothing_to_learn(table, data):
        log.warning(note)
    if len(table) < 2 * config.num_workers:
        raise SteelsegError(
            f"{data}: {len(table)} images are too few for {config.num_workers} workers"
        )
    return catalog.split(table, val_fraction=config.val_fraction, seed=config.seed)


def inspect_on_nodes(paths: list[str], decode: bool) -> list[catalog.ImageInfo]:
    """``catalog.inspect_many`` in Ray tasks, so that a bucket's images are read by the nodes,
    not all by this one."""
    import ray

    task = ray.remote(num_cpus=1)(catalog.inspect_many)
    chunks = [paths[i : i + INSPECT_CHUNK] for i in range(0, len(paths), INSPECT_CHUNK)]
    return [info for part in ray.get([task.remote(c, decode) for c in chunks]) for info in part]


def check_paths_on_nodes(config: TrainConfig) -> None:
    """On a cluster of several nodes, the local paths the workers use must be the same on all:
    the storage folder, the data set (its train.csv) and a pretrained weights file."""
    if node_count() < 2:
        return
    check_shared(locate(config.storage, "storage"), "storage", write=True)
    check_shared(data_folder(config) / "train.csv", "data", write=False)
    if config.pretrained and config.pretrained != "imagenet":
        check_shared(locate(config.pretrained, "pretrained"), "pretrained", write=False)


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
    calibration: dict | None = None  # the calibration report of the best checkpoint, if made


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
    if data_folder(config).local:  # a bad data set is found before Ray starts
        train_table, val_table = load_split(config)
        init_ray(cpus_needed(config), verbose=verbose)
    else:  # the images are checked where they are read, on the cluster's nodes
        init_ray(cpus_needed(config), verbose=verbose)
        train_table, val_table = load_split(config, inspect=inspect_on_nodes)
    check_paths_on_nodes(config)
    runs.write_split(config.run_dir, train_table, val_table)
    train_table = sampling.oversample(train_table, config.rare_share)
    relay = progress.Relay(on_progress) if on_progress else None
    with relay or contextlib.nullcontext():
        result = build_trainer(config, train_table, val_table, callbacks, relay).fit()
    best = result.get_best_checkpoint(runs.SCORE, "max") if result.best_checkpoints else None
    best = config.run_dir / posixpath.basename(best.path) if best else None
    calibration = None
    if config.calibrate and best and not result.error:
        calibration = calibrate_on_cluster(best, config.use_gpu)
    return FitResult(
        run_dir=config.run_dir,
        metrics=dict(result.metrics or {}),
        best_checkpoint=best,
        error=result.error,
        calibration=calibration,
    )


def calibrate_on_cluster(checkpoint: Location, use_gpu: bool) -> dict | None:
    """``steelseg calibrate`` of the best checkpoint, in a Ray task (on a GPU node when the run
    used GPUs: the driver's node may have none). A failure costs only the rules: it is logged,
    and the run stays as it is."""
    import ray

    from steelseg.inference.calibrate import calibration_report

    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(calibration_report)
    try:
        return ray.get(task.remote(checkpoint.target, use_gpu))
    except (SteelsegError, ray.exceptions.RayTaskError) as e:
        reason = " ".join(str(e).split())
        log.warning("calibration of %s failed: %s", checkpoint.target, reason[-300:])
        return None


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
            "train_images": len(train_table),
            "progress": relay.queue if relay else None,
        },
        scaling_config=ScalingConfig(
            num_workers=config.workers,
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
