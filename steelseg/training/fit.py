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
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import ray.exceptions
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchTrainer

from steelseg import runs
from steelseg.cluster import check_shared, init_ray, node_count
from steelseg.config import TrainConfig
from steelseg.data import catalog, pipeline, sampling, synth
from steelseg.data.images import path_columns
from steelseg.domain import RLE_COLUMNS
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
    config: TrainConfig,
    inspect: catalog.Inspect = catalog.inspect_many,
    checks: tuple[Location, ...] = (),
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's split of the data set as it is now.

    The images are decoded in full once: a later start on a data set whose listing is
    unchanged (``catalog.fingerprint``) reads none of them: it keeps the images the full check
    passed, at the size it found. The check is recorded in the run's folder and in its storage's
    ``data_checks/`` (for new runs on the same data), and looked for there and in ``checks``
    (a sweep's folder). The split is made by a run's first start and kept by its
    resumes (``catalog.keep_split``): images new since then train only, and images that are
    gone are named.
    """
    data, run_dir = data_folder(config), config.run_dir
    shared = runs.data_checks_dir(config.storage_path, data.target, config.modalities)
    table = checked_table(config, data, inspect, (run_dir, shared, *checks))
    if note := catalog.nothing_to_learn(table, data):
        log.warning(note)
    if len(table) < 2 * config.num_workers:
        raise SteelsegError(
            f"{data}: {len(table)} images are too few for {config.num_workers} workers"
        )
    if not runs.has_split(run_dir):
        train, val = catalog.split(table, val_fraction=config.val_fraction, seed=config.seed)
        runs.write_split(run_dir, train, val)
        return train, val
    train, val, new, gone = catalog.keep_split(table, runs.read_split(run_dir))
    if new:
        log.info("%d image(s) new since the run's split: they train, never validate", len(new))
    if gone:
        more = f" and {len(gone) - 5} more" if len(gone) > 5 else ""
        log.warning(
            "image(s) of the run's split gone from %s: %s%s", data, ", ".join(gone[:5]), more
        )
    if new or gone:
        runs.write_split(run_dir, train, val)
    return train, val


def checked_table(
    config: TrainConfig, data: Location, inspect: catalog.Inspect, records: tuple[Location, ...]
) -> pd.DataFrame:
    """``catalog.load`` of the data set: decoded in full unless one of ``records`` (run or
    sweep folders) holds a check of this very listing, which is then trusted (no image read:
    the images that check kept, their size, and whether they are grey; a record without the
    size, from before it was kept, costs each image's header); a full check is recorded in
    ``records[0]`` and ``records[1]``. The table's ``grey`` column is the data set's: True on
    every row when every image is grey."""
    fingerprint = catalog.fingerprint(data, config.modalities)
    found = [(place, runs.read_data_check(place)) for place in records]
    # a check that dropped images stands only for runs that drop them too; one that kept the
    # images' size first (it costs no image read)
    usable = [
        (place, r)
        for place, r in found
        if r and r["fingerprint"] == fingerprint and (config.drop_bad or not r["dropped"])
    ]
    usable.sort(key=lambda pair: not pair[1].get("size"))
    source, record = usable[0] if usable else (None, None)
    if record is not None and record.get("size"):
        inspect = inspect_from_record(inspect, record, data, config.modalities)
    dropped: list[str] = []
    table = catalog.load(
        data,
        modalities=config.modalities,
        drop_bad=config.drop_bad,
        report=log.warning,
        decode_images=record is None,
        inspect=inspect,
        dropped=dropped,
    )
    if record is not None:
        table = table[table["image_id"].isin(set(record["images"]))].reset_index(drop=True)
        grey = bool(record.get("grey", False))  # a record before it: not known grey
        table["grey"] = grey
        if source is not None and not record.get("size") and (size := one_size(table)):
            # a record from before the size was kept: the headers just read give it, once
            runs.write_data_check(
                source, fingerprint, record["images"], record["dropped"], grey, size
            )
        return table
    grey = bool(len(table)) and bool(table["grey"].all())
    table["grey"] = grey
    size = one_size(table)
    for place in records[:2]:  # the run's, and its storage's for the runs after it
        runs.write_data_check(place, fingerprint, list(table["image_id"]), len(dropped), grey, size)
    return table


def one_size(table: pd.DataFrame) -> list[int] | None:
    """``[height, width]`` of a table whose images all have one size, else None."""
    sizes = set(zip(table["height"], table["width"]))
    return [int(v) for v in sizes.pop()] if len(sizes) == 1 else None


def inspect_from_record(
    inspect: catalog.Inspect, record: dict, data: Location, modalities: list[str]
) -> catalog.Inspect:
    """``inspect`` that answers from a data check's record for the images it passed (the
    record's size, three channels: what the check found) and reads only the others, such as
    those it dropped; a data set checked once costs no image read at the next start."""
    height, width = record["size"]
    passed = {
        (data / catalog.modality_dir(m) / image).target
        for m in modalities
        for image in record["images"]
    }

    def answer(paths: Sequence[str], decode: bool) -> list[catalog.ImageInfo]:
        others = [p for p in paths if p not in passed]
        read = iter(inspect(others, decode) if others else [])
        known = catalog.ImageInfo(height, width, 3)
        return [known if p in passed else next(read) for p in paths]

    return answer


def inspect_on_nodes(paths: Sequence[str], decode: bool) -> list[catalog.ImageInfo]:
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
    error: SteelsegError | None = None  # why the run failed (one line), None if it finished
    calibration: dict | None = None  # the calibration report of the best checkpoint, if made


def fit(
    config: TrainConfig,
    callbacks: list | None = None,
    *,
    on_progress: Callable[[tuple], None] | None = None,
    verbose: bool = False,
    checks: tuple[Location, ...] = (),
) -> FitResult:
    """Train (or resume) the run ``<storage>/<name>``.

    ``callbacks``: Ray Train callbacks, e.g. Tune's ``TuneReportCallback`` in a sweep's trial.
    ``on_progress``: called on this process with rank 0's progress events
    (``steelseg.training.progress``), e.g. a front end's display.
    ``verbose``: Ray's own logs and the workers' output too, when this call starts Ray.
    ``checks``: folders besides the run's where a full check of the data set may be recorded
    (a sweep's, for its trials).

    A run that fails (a worker's error, after ``max_failures`` restarts) or whose loss diverges
    returns with ``error`` set, its checkpoints kept.
    """
    config = config.resolved()
    if data_folder(config).local:  # a bad data set is found before Ray starts
        train_table, val_table = load_split(config, checks=checks)
        init_ray(cpus_needed(config), verbose=verbose)
    else:  # the images are checked where they are read, on the cluster's nodes
        init_ray(cpus_needed(config), verbose=verbose)
        train_table, val_table = load_split(config, inspect=inspect_on_nodes, checks=checks)
    pipeline.check_crop(config, train_table)  # validation takes whole images
    check_paths_on_nodes(config)
    train_table = sampling.oversample(train_table, config.rare_share)
    relay = progress.Relay(on_progress) if on_progress else None
    try:
        with relay or contextlib.nullcontext():
            result = build_trainer(config, train_table, val_table, callbacks, relay).fit()
    except (TrainingFailedError, ray.exceptions.RayError) as e:  # RayError: the controller died
        return failed(config, f"training failed: {failure_reason(e)}")
    metrics = dict(result.metrics or {})  # Ray's: the last report with a checkpoint
    history = runs.read_history(config.run_dir)
    last = history.iloc[-1].to_dict() if len(history) else {}
    if isinstance(last.get("diverged"), str):  # that epoch reported no checkpoint
        return failed(config, f"training diverged: {last['diverged']}", last)
    best = result.get_best_checkpoint(runs.SCORE, "max") if result.best_checkpoints else None
    best = config.run_dir / posixpath.basename(best.path) if best else None
    calibration = None
    if config.calibrate and best:
        calibration = calibrate_on_cluster(best, config.use_gpu)
    return FitResult(
        run_dir=config.run_dir, metrics=metrics, best_checkpoint=best, calibration=calibration
    )


def failed(config: TrainConfig, reason: str, metrics: dict | None = None) -> FitResult:
    """The result of a run that stopped on an error: its kept checkpoints stay, uncalibrated."""
    kept = runs.kept_checkpoints(config.run_dir)
    best = runs.best_checkpoint(config.run_dir) if kept else None
    return FitResult(config.run_dir, metrics or {}, best, SteelsegError(reason))


# an exception's line in a traceback's text: "steelseg.errors.SteelsegError: message"
EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", re.MULTILINE)
# what Ray Data appends to the message of an error its task raised: "\nFailed to apply UDF
# transform after 1/1 attempts (total backoff 0.0s).\nTo change retry attempts, ..."
RAY_RETRY_NOTE = re.compile(
    r"\s*Failed to [^\n]* after \d+/\d+ attempts \(total backoff.*", re.DOTALL
)


def _names_ours(error: BaseException) -> bool:
    """Whether a worker's error is, or its traceback names, a steelseg error."""
    return isinstance(error, SteelsegError) or "steelseg.errors." in str(error)


def failure_reason(error: BaseException) -> str:
    """What went wrong, on one line, from Ray Train's ``TrainingFailedError`` (or the error of
    its controller's death, e.g. Ray's memory monitor ending it): the first failed
    worker's own error (a steelseg error's message as it is, another error with its type), not
    Ray's wrappers. An error from a Ray Data task reaches the worker as its traceback's text,
    which is read for the error that started it."""
    failures = getattr(error, "worker_failures", None)
    if failures:  # a rank's own error before another's collateral one (a broken collective)
        ranks = sorted(failures, key=lambda r: (not _names_ours(failures[r]), r))
        error = failures[ranks[0]]
    error = getattr(error, "controller_failure", error)
    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and cause not in chain:
        chain.append(cause)
        # Ray's task errors keep the task's exception as ``cause``
        cause = getattr(cause, "cause", None) or cause.__cause__
    mine = [e for e in chain if isinstance(e, SteelsegError)]
    if mine:
        return " ".join(RAY_RETRY_NOTE.sub("", str(mine[-1])).split())
    memory = next((m for e in chain if (m := memory_reason(str(e)))), None)
    if memory:
        return memory
    lines = [m.groups() for e in chain for m in EXCEPTION_LINE.finditer(str(e))]
    ours = [message for kind, message in lines if kind.startswith("steelseg.")]
    if ours:
        return ours[-1].strip()
    if lines:  # a traceback names the error that started it first
        kind, message = lines[0]
        return f"{kind.rsplit('.', 1)[-1]}: {message.strip()}"
    root = chain[-1]
    first = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
    return f"{type(root).__name__}: {first}"


# Ray's memory monitor's message: "... Memory on the node (IP: ...) where the task (...) was
# running was 22.10GB / 23.26GB (0.950083), and the memory usage threshold of 0.95 was exceeded."
MEMORY_USE = re.compile(r"was (\d+(?:\.\d+)?GB / \d+(?:\.\d+)?GB)")


def memory_reason(text: str) -> str | None:
    """One line for a process that Ray's memory monitor killed (an ``OutOfMemoryError``, or an
    actor that died of it), with the node's memory use; None for any other error."""
    if "low on memory" not in text and "memory monitor" not in text:
        return None
    used = MEMORY_USE.search(text)
    return (
        "Ray killed a process because its node ran low on memory"
        + (f" ({used.group(1)} in use)" if used else "")
        + ": lower --batch-size or give each worker more of a node (--cpus-per-worker)"
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
            "train_table": pipeline_columns(train_table, config),
            "val_table": pipeline_columns(val_table, config),
            # the visible images are read as one grey channel (``images.read_stack``)
            "grey": bool(train_table["grey"].all()) if "grey" in train_table else False,
            "progress": relay.queue if relay else None,
        },
        scaling_config=ScalingConfig(
            # (min, max) is elastic: Train V2's ScalingConfig, which mypy does not see
            num_workers=config.workers,  # type: ignore[arg-type]
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
    )


def pipeline_columns(table: pd.DataFrame, config: TrainConfig) -> pd.DataFrame:
    """The columns the workers' pipelines read (paths, sizes and RLE strings), each worker's
    copy of the split."""
    columns = ["image_id", *path_columns(config.modalities), "height", "width", *RLE_COLUMNS]
    return table[columns].reset_index(drop=True)
