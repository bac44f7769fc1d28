"""A run's files and a sweep's, in one place: every reader and writer of them goes through here
(training, resume, Tune, calibration, prediction, evaluation, figures), so where a run lives is
decided by this module alone. Readable without Ray. A run lives in a local or shared folder or
in an object store (``s3://``, ``gs://``): every function takes a path, a URI or a
``steelseg.storage.Location``.

A training run, ``<storage>/<name>/``::

    epoch_NNNN/model.pt         the weights, the whole config, the epoch and its metrics (Ray keeps
                                the best K checkpoints by val Dice and the latest)
    epoch_NNNN/training_state.pt  optimizer, scheduler and step, for a resume
    epoch_NNNN/postprocess.json the calibrated post-processing rules of that checkpoint
    history.jsonl               every epoch's metrics, one JSON line each
    split.parquet               the catalog with each image's split (train or val): made by the
                                run's first start, kept by its resumes
    data_check.json             the data set's listing fingerprint when its images were last
                                decoded in full, the images that passed and their size
    tensorboard/                the curves and validation figures

A storage folder keeps ``data_checks/<digest>/data_check.json`` too, the last full check of each
data set its runs used, so that a new run on unchanged data reads no image.

A sweep, ``<storage>/<name>/``: ``trials/<trial>/`` is each trial's training run,
``results.csv`` the trials sorted by val Dice, ``data_check.json`` the check of the data set its
trials share, ``best_config.yaml`` the best trial's config and
``best_checkpoint.txt`` the path of its best checkpoint.
"""

import hashlib
import io
import json
import math
import os
import posixpath
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import torch
import yaml

from steelseg.config import TrainConfig
from steelseg.data import catalog
from steelseg.errors import SteelsegError, one_line
from steelseg.inference.postprocess import Rules
from steelseg.storage import Location, locate, reason
from steelseg.training.recipe import build_model

MODEL_FILE = "model.pt"  # weights, config, epoch, metrics
TRAINING_FILE = "training_state.pt"  # optimizer, scheduler, step: for a resume
MODEL_KEYS = ("model", "config", "epoch", "metrics")
TRAINING_KEYS = ("optimizer", "scheduler", "global_step")  # what a resume reads
TORCH_FILE_START = b"PK\x03\x04"  # torch.save writes a zip archive
RULES_FILE = "postprocess.json"
HISTORY_FILE = "history.jsonl"
SPLIT_FILE = "split.parquet"
DATA_CHECK_FILE = "data_check.json"
DATA_CHECKS_DIR = "data_checks"  # in a storage folder: the checks its runs share
TENSORBOARD_DIR = "tensorboard"
TRIALS_DIR = "trials"
RESULTS_FILE = "results.csv"
BEST_CONFIG_FILE = "best_config.yaml"
BEST_MODEL_FILE = "best_checkpoint.txt"
SCORE = "val_kaggle_dice"  # what "best" means for checkpoints and trials

Where = str | os.PathLike | Location


# --- checkpoints ---------------------------------------------------------------------------


def checkpoint_name(epoch: int) -> str:
    """The folder name of the checkpoint written after ``epoch`` (1-based)."""
    return f"epoch_{epoch:04d}"


def write_state(folder: Where, state: dict) -> None:
    """Save a checkpoint: the model part (weights, config, epoch, metrics: all that prediction
    reads) and the training part (optimizer, scheduler, step: only a resume reads it) apart, so
    that loading a model for prediction moves a third of the bytes."""
    place = locate(folder, "checkpoint")
    for name, part in _split_state(state).items():
        buffer = io.BytesIO()
        torch.save(part, buffer)
        (place / name).write_bytes(buffer.getvalue())


def _split_state(state: dict) -> dict[str, dict]:
    model = {k: v for k, v in state.items() if k in MODEL_KEYS}
    return {MODEL_FILE: model, TRAINING_FILE: {k: v for k, v in state.items() if k not in model}}


def _load(file: Location, keys: tuple[str, ...], mmap: bool = False) -> dict:
    """A checkpoint file's dict, which must hold ``keys``.

    Raises:
        SteelsegError: no such file, or one that is cut short, corrupt or not steelseg's, named.
    """
    if not file.is_file():
        raise SteelsegError(f"{file.parent}: not a steelseg checkpoint (no {file.name})")
    data = None if file.local else file.read_bytes()
    start = file.read_bytes(len(TORCH_FILE_START)) if data is None else data
    if not start.startswith(TORCH_FILE_START):
        raise SteelsegError(f"{file}: not a steelseg checkpoint (not a file torch.save writes)")
    source = file.path if data is None else io.BytesIO(data)
    try:
        state = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap and file.local)
    except Exception as e:  # torch raises many kinds for a damaged file
        raise SteelsegError(f"{file}: cannot read the checkpoint ({one_line(e)})") from None
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise SteelsegError(f"{file}: not a steelseg checkpoint (no {', '.join(missing)})")
    return state


def read_model_state(folder: Where, *, mmap: bool = False) -> dict:
    """The model part of a checkpoint: weights, config, epoch and metrics (tensors on the CPU);
    ``mmap`` maps a local file instead of reading it.

    Raises:
        SteelsegError: the folder holds no checkpoint, or a broken one.
    """
    return _load(locate(folder, "checkpoint") / MODEL_FILE, ("model", "config"), mmap)


def read_state(folder: Where) -> dict:
    """The whole checkpoint, the training part too (what a resume needs)."""
    place = locate(folder, "checkpoint")
    model_part = _load(place / MODEL_FILE, ("model", "config", "epoch"))
    return {**model_part, **_load(place / TRAINING_FILE, TRAINING_KEYS)}


def load_config(folder: Where, *, check_weights: bool = False) -> TrainConfig:
    """The run config stored in a checkpoint, without reading its tensors when it is local;
    with ``check_weights`` the weights are read too and must be finite.

    Raises:
        SteelsegError: no checkpoint, a broken one, a config in it that is not valid, or (with
            ``check_weights``) weights that are NaN or infinite.
    """
    place = locate(folder, "checkpoint")
    state = read_model_state(place, mmap=True)
    if check_weights:
        _check_finite(state["model"], place / MODEL_FILE)
    return _stored_config(state, place / MODEL_FILE)


def _check_finite(weights: dict, file: Location) -> None:
    broken = [
        name
        for name, value in weights.items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if broken:
        raise SteelsegError(
            f"{file}: {len(broken)} weight tensor(s) are NaN or infinite, e.g. {broken[0]} (the "
            "run diverged); use an earlier checkpoint"
        )


def _stored_config(state: dict, file: Location) -> TrainConfig:
    values = state["config"]
    if not isinstance(values, dict):
        kind = type(values).__name__
        raise SteelsegError(f"{file}: not a steelseg checkpoint (its config is a {kind})")
    try:
        return TrainConfig.from_dict(values)
    except SteelsegError as e:
        raise SteelsegError(f"{file}: {e}") from None


def load_checkpoint(folder: Where) -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Rebuild the trained model from a checkpoint folder alone: (model in eval mode, config,
    the checkpoint's model part).

    Raises:
        SteelsegError: no checkpoint, a broken one, weights that do not fit its config, or
            weights that are not finite (a run that diverged).
    """
    place = locate(folder, "checkpoint")
    state = read_model_state(place)
    config = _stored_config(state, place / MODEL_FILE)
    model = build_model(config.replace(pretrained=""))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError) as e:  # other keys or shapes; not a state_dict
        raise SteelsegError(
            f"{place / MODEL_FILE}: the weights do not fit the model of its config ({one_line(e)})"
        ) from None
    _check_finite(state["model"], place / MODEL_FILE)
    return model.eval(), config, state


def kept_checkpoints(run: Where) -> dict[int, Location]:
    """The run's checkpoint folders by epoch."""
    kept = {}
    for child in locate(run, "run").children():
        epoch = child.name.removeprefix("epoch_")
        if epoch.isdigit() and (child / MODEL_FILE).is_file():
            kept[int(epoch)] = child
    return kept


def best_checkpoint(run: Where) -> Location:
    """The kept checkpoint of a run with the best val Dice (the later epoch on a tie).

    Raises:
        SteelsegError: the folder has no checkpoint.
    """
    kept = kept_checkpoints(run)
    if not kept:
        raise SteelsegError(f"{run}: no checkpoint (no epoch_*/{MODEL_FILE})")
    history = read_history(run)
    if history.empty:
        return kept[max(kept)]
    scores = history.set_index("epoch")[SCORE].fillna(-1.0).to_dict()
    return kept[max(kept, key=lambda epoch: (scores.get(epoch, -1.0), epoch))]


def resolve_checkpoint(where: Where) -> Location:
    """A checkpoint folder from a checkpoint (its folder or its model.pt), a training run (its
    best checkpoint) or a sweep (its best trial's best checkpoint).

    Raises:
        SteelsegError: the path is none of these.
    """
    place = locate(where, "checkpoint")
    if place.is_file():
        if place.name == MODEL_FILE:
            return place.parent
        raise SteelsegError(
            f"{place}: a file; give a checkpoint (its folder or its {MODEL_FILE}), a run or a sweep"
        )
    if (place / MODEL_FILE).is_file():
        return place
    if (place / BEST_MODEL_FILE).is_file():
        return resolve_checkpoint(_read_pointer(place / BEST_MODEL_FILE))
    if kept_checkpoints(place):
        return best_checkpoint(place)
    if not place.exists():
        raise SteelsegError(f"{place}: no such checkpoint, run or sweep")
    raise SteelsegError(
        f"{place}: not a checkpoint (no {MODEL_FILE}), a run (no epoch_*/) or a finished "
        f"sweep (no {BEST_MODEL_FILE})"
    )


def _read_pointer(file: Location) -> str:
    try:
        return file.read_text().strip()
    except UnicodeDecodeError as e:
        raise SteelsegError(f"{file}: not the path of a checkpoint ({one_line(e)})") from None


def save_rules(checkpoint: Where, rules: Rules, report: dict | None = None) -> Location:
    """Store calibrated post-processing rules (and the calibration's report) with a checkpoint."""
    file = locate(checkpoint, "checkpoint") / RULES_FILE
    file.write_text(json.dumps({**rules.to_dict(), "calibration": report or {}}, indent=2))
    return file


def load_rules(checkpoint: Where) -> Rules | None:
    """The calibrated rules stored with a checkpoint, or None when it was never calibrated."""
    file = locate(checkpoint, "checkpoint") / RULES_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except ValueError as e:  # not JSON, or not text
        raise SteelsegError(f"{file}: cannot read ({one_line(e)})") from None
    return Rules.from_dict(data, str(file))


def read_calibration(checkpoint: Where) -> dict:
    """The report stored with the rules: scores before and after, images, TTA."""
    return json.loads((locate(checkpoint, "checkpoint") / RULES_FILE).read_text())["calibration"]


# --- history, split, TensorBoard -----------------------------------------------------------


def append_history(run: Where, metrics: dict) -> None:
    """One JSON line per epoch; undefined scores (NaN, e.g. a class absent from val) as null.
    The file is rewritten whole: an object store cannot append."""
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}
    _write_history(run, [*_history_rows(run), clean])


def trim_history(run: Where, last_epoch: int) -> None:
    """Drop epochs after the checkpoint we resume from (a failed attempt's)."""
    _write_history(run, [m for m in _history_rows(run) if m["epoch"] <= last_epoch])


def _write_history(run: Where, rows: list[dict]) -> None:
    file = locate(run, "run") / HISTORY_FILE
    file.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _history_rows(run: Where) -> list[dict]:
    file = locate(run, "run") / HISTORY_FILE
    if not file.is_file():
        return []
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def read_history(run: Where) -> pd.DataFrame:
    """Every epoch's metrics of a run, in order: what each epoch reported, resumes included."""
    history = pd.DataFrame(_history_rows(run))
    undefined = [c for c in history.columns if history[c].isna().all()]  # a score never defined
    return history.astype(dict.fromkeys(undefined, float))


def write_split(run: Where, train: pd.DataFrame, val: pd.DataFrame) -> None:
    table = pd.concat([train.assign(split="train"), val.assign(split="val")], ignore_index=True)
    buffer = io.BytesIO()
    catalog.write_table(table, buffer)
    (locate(run, "run") / SPLIT_FILE).write_bytes(buffer.getvalue())


def read_split(run: Where, which: str | None = None) -> pd.DataFrame:
    """The run's catalog with its ``split`` column, or only the rows of ``which`` split.

    Raises:
        SteelsegError: the run has no split file.
    """
    file = locate(run, "run") / SPLIT_FILE
    if not file.is_file():
        raise SteelsegError(f"{run}: no {SPLIT_FILE} (the run's train/validation split)")
    table = catalog.read_table(file.open_buffer())
    if which is not None:
        table = table[table["split"] == which].reset_index(drop=True)
    return table


def has_split(run: Where) -> bool:
    return (locate(run, "run") / SPLIT_FILE).is_file()


def data_checks_dir(storage: Where, data: str, modalities: list[str]) -> Location:
    """Where a storage keeps the check of one data set (its URI or path and modalities) for
    every run in it: ``<storage>/data_checks/<digest>/``."""
    key = hashlib.sha1(f"{data}|{','.join(modalities)}".encode()).hexdigest()[:16]
    return locate(storage, "storage") / DATA_CHECKS_DIR / key


def read_data_check(place: Where) -> dict | None:
    """The data check recorded in a run's or a sweep's folder (``write_data_check``), or None."""
    file = locate(place, "run") / DATA_CHECK_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError:  # cut short, or not text: as if never checked
        return None


def write_data_check(
    place: Where,
    fingerprint: str,
    images: list[str],
    dropped: int,
    grey: bool = False,
    size: list[int] | None = None,
) -> None:
    """Record that the data set whose listing has ``fingerprint`` was decoded in full, that
    ``images`` passed and ``dropped`` did not (``--drop-bad``), whether every visible image
    that passed is grey (equal channels), and their one size ``[height, width]``."""
    record = {
        "fingerprint": fingerprint,
        "images": list(images),
        "dropped": dropped,
        "grey": grey,
        "size": size,
    }
    (locate(place, "run") / DATA_CHECK_FILE).write_text(json.dumps(record))


def tensorboard_dir(run: Where) -> Location:
    return locate(run, "run") / TENSORBOARD_DIR


def fetch_tensorboard(run: Where, cache: str | os.PathLike) -> Path:
    """The run's TensorBoard folder on this machine: itself when local, else copied into
    ``cache``.

    Raises:
        SteelsegError: the run has no TensorBoard folder.
    """
    folder = tensorboard_dir(run)
    if not folder.is_dir():
        raise SteelsegError(f"{run}: no {TENSORBOARD_DIR}/ folder (is it a training run?)")
    return Path(folder.path) if folder.local else folder.download(cache)


def sync_tensorboard(where: Where, cache: str | os.PathLike) -> int:
    """Mirror the TensorBoard files of a run or a sweep (every ``tensorboard/`` folder below
    it) into the local folder ``cache``, copying only files that are new or changed in size or
    time. Returns how many were copied."""
    place = locate(where, "run or sweep")
    try:
        found = place.fs.get_file_info(pafs.FileSelector(place.path, recursive=True))
    except OSError as e:
        raise SteelsegError(f"{place}: {reason(e)}") from None
    cache = Path(cache)
    manifest_file = cache / ".steelseg-sync.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    copied = 0
    for info in found:
        relative = posixpath.relpath(info.path, place.path)
        if info.type != pafs.FileType.File or TENSORBOARD_DIR not in relative.split("/")[:-1]:
            continue
        stamp = [info.size, info.mtime_ns]
        if manifest.get(relative) == stamp and (cache / relative).is_file():
            continue
        (cache / relative).parent.mkdir(parents=True, exist_ok=True)
        (cache / relative).write_bytes((place / relative).read_bytes())
        manifest[relative] = stamp
        copied += 1
    cache.mkdir(parents=True, exist_ok=True)
    manifest_file.write_text(json.dumps(manifest))
    return copied


# --- sweeps --------------------------------------------------------------------------------


def trials_dir(sweep: Where) -> Location:
    """Where a sweep's trials keep their training runs (``trials/<trial>/``)."""
    return locate(sweep, "sweep") / TRIALS_DIR


def write_sweep_results(
    sweep: Where, table: pd.DataFrame, best_config: TrainConfig, best: Location
) -> None:
    """The trials' table, the best trial's config (for ``train --config``) and its best
    checkpoint (its whole URI, so that predict finds it)."""
    place = locate(sweep, "sweep")
    (place / RESULTS_FILE).write_text(table.to_csv(index=False))
    (place / BEST_CONFIG_FILE).write_text(yaml.safe_dump(best_config.to_dict()))
    (place / BEST_MODEL_FILE).write_text(f"{best.target}\n")


def read_sweep_results(sweep: Where) -> pd.DataFrame:
    return pd.read_csv(io.StringIO((locate(sweep, "sweep") / RESULTS_FILE).read_text()))


def best_config_path(sweep: Where) -> Location:
    return locate(sweep, "sweep") / BEST_CONFIG_FILE
