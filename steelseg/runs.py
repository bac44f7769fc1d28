"""A run's files and a sweep's, in one place: every reader and writer of them goes through here
(training, resume, Tune, calibration, prediction, evaluation, figures), so where a run lives is
decided by this module alone. Readable without Ray.

A training run, ``<storage>/<name>/``::

    epoch_NNNN/checkpoint.pt    model, optimizer, scheduler, epoch and the whole config (Ray keeps
                                the best K by val Dice and the latest)
    epoch_NNNN/postprocess.json the calibrated post-processing rules of that checkpoint
    history.jsonl               every epoch's metrics, one JSON line each
    split.parquet               the catalog with each image's split (train or val)
    tensorboard/                the curves and validation figures

A sweep, ``<storage>/<name>/``: ``trials/<trial>/`` is each trial's training run,
``results.csv`` the trials sorted by val Dice, ``best_config.yaml`` the best trial's config and
``best_checkpoint.txt`` the path of its best checkpoint.
"""

import json
import math
import os
from pathlib import Path

import pandas as pd
import torch
import yaml

from steelseg.config import TrainConfig
from steelseg.data import catalog
from steelseg.errors import SteelsegError
from steelseg.inference.postprocess import Rules
from steelseg.paths import local_path
from steelseg.training.recipe import build_model

CHECKPOINT_FILE = "checkpoint.pt"
RULES_FILE = "postprocess.json"
HISTORY_FILE = "history.jsonl"
SPLIT_FILE = "split.parquet"
TENSORBOARD_DIR = "tensorboard"
TRIALS_DIR = "trials"
RESULTS_FILE = "results.csv"
BEST_CONFIG_FILE = "best_config.yaml"
BEST_CHECKPOINT_FILE = "best_checkpoint.txt"
SCORE = "val_kaggle_dice"  # what "best" means for checkpoints and trials

PathLike = str | os.PathLike


# --- checkpoints ---------------------------------------------------------------------------


def checkpoint_name(epoch: int) -> str:
    """The folder name of the checkpoint written after ``epoch`` (1-based)."""
    return f"epoch_{epoch:04d}"


def write_state(folder: PathLike, state: dict) -> Path:
    path = Path(folder) / CHECKPOINT_FILE
    torch.save(state, path)
    return path


def read_state(folder: PathLike, *, mmap: bool = False) -> dict:
    """The raw checkpoint dict (tensors on the CPU).

    Raises:
        SteelsegError: the folder holds no checkpoint.
    """
    file = Path(folder) / CHECKPOINT_FILE
    if not file.is_file():
        raise SteelsegError(f"{folder}: not a steelseg checkpoint (no {CHECKPOINT_FILE})")
    return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)


def load_config(folder: PathLike) -> TrainConfig:
    """The run config stored in a checkpoint, without reading its ~200 MB of tensors."""
    return TrainConfig.from_dict(read_state(folder, mmap=True)["config"], str(folder))


def load_checkpoint(folder: PathLike) -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Rebuild the trained model from a checkpoint folder alone: (model in eval mode, config,
    state)."""
    state = read_state(folder)
    config = TrainConfig.from_dict(state["config"], str(Path(folder) / CHECKPOINT_FILE))
    model = build_model(config.replace(pretrained=""))
    model.load_state_dict(state["model"])
    return model.eval(), config, state


def kept_checkpoints(run_dir: PathLike) -> dict[int, Path]:
    """The run's checkpoint folders by epoch."""
    return {
        int(p.name.split("_")[1]): p
        for p in Path(run_dir).glob("epoch_*")
        if (p / CHECKPOINT_FILE).is_file()
    }


def best_checkpoint(run_dir: PathLike) -> Path:
    """The kept checkpoint of a run with the best val Dice (the later epoch on a tie).

    Raises:
        SteelsegError: the folder has no checkpoint.
    """
    kept = kept_checkpoints(run_dir)
    if not kept:
        raise SteelsegError(f"{run_dir}: no checkpoint (no epoch_*/{CHECKPOINT_FILE})")
    history = read_history(run_dir)
    if history.empty:
        return kept[max(kept)]
    scores = history.set_index("epoch")[SCORE].fillna(-1.0).to_dict()
    return kept[max(kept, key=lambda epoch: (scores.get(epoch, -1.0), epoch))]


def resolve_checkpoint(path: PathLike) -> Path:
    """A checkpoint folder from a checkpoint, a training run (its best checkpoint) or a sweep
    (its best trial's best checkpoint).

    Raises:
        SteelsegError: the path is none of these.
    """
    path = local_path(path, "checkpoint").resolve()
    if (path / CHECKPOINT_FILE).is_file():
        return path
    if (path / BEST_CHECKPOINT_FILE).is_file():
        return resolve_checkpoint((path / BEST_CHECKPOINT_FILE).read_text().strip())
    if kept_checkpoints(path):
        return best_checkpoint(path)
    if not path.exists():
        raise SteelsegError(f"{path}: no such checkpoint, run or sweep")
    raise SteelsegError(
        f"{path}: not a checkpoint (no {CHECKPOINT_FILE}), a run (no epoch_*/) or a finished "
        f"sweep (no {BEST_CHECKPOINT_FILE})"
    )


def save_rules(checkpoint: PathLike, rules: Rules, report: dict | None = None) -> Path:
    """Store calibrated post-processing rules (and the calibration's report) with a checkpoint."""
    path = Path(checkpoint) / RULES_FILE
    path.write_text(json.dumps({**rules.to_dict(), "calibration": report or {}}, indent=2))
    return path


def load_rules(checkpoint: PathLike) -> Rules | None:
    """The calibrated rules stored with a checkpoint, or None when it was never calibrated."""
    path = Path(checkpoint) / RULES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SteelsegError(f"{path}: cannot read ({e})") from None
    return Rules.from_dict(data, str(path))


def read_calibration(checkpoint: PathLike) -> dict:
    """The report stored with the rules: scores before and after, images, TTA."""
    return json.loads((Path(checkpoint) / RULES_FILE).read_text())["calibration"]


# --- history, split, TensorBoard -----------------------------------------------------------


def append_history(run_dir: PathLike, metrics: dict) -> None:
    """One JSON line per epoch; undefined scores (NaN, e.g. a class absent from val) as null."""
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}
    with open(Path(run_dir) / HISTORY_FILE, "a") as f:
        f.write(json.dumps(clean) + "\n")


def trim_history(run_dir: PathLike, last_epoch: int) -> None:
    """Drop epochs after the checkpoint we resume from (a failed attempt's)."""
    kept = [m for m in _history_rows(run_dir) if m["epoch"] <= last_epoch]
    (Path(run_dir) / HISTORY_FILE).write_text("".join(json.dumps(m) + "\n" for m in kept))


def _history_rows(run_dir: PathLike) -> list[dict]:
    path = Path(run_dir) / HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_history(run_dir: PathLike) -> pd.DataFrame:
    """Every epoch's metrics of a run, in order: what each epoch reported, resumes included."""
    history = pd.DataFrame(_history_rows(run_dir))
    undefined = [c for c in history.columns if history[c].isna().all()]  # a score never defined
    return history.astype(dict.fromkeys(undefined, float))


def write_split(run_dir: PathLike, train: pd.DataFrame, val: pd.DataFrame) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    table = pd.concat([train.assign(split="train"), val.assign(split="val")], ignore_index=True)
    catalog.write_table(table, Path(run_dir) / SPLIT_FILE)


def read_split(run_dir: PathLike, which: str | None = None) -> pd.DataFrame:
    """The run's catalog with its ``split`` column, or only the rows of ``which`` split.

    Raises:
        SteelsegError: the run has no split file.
    """
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        raise SteelsegError(f"{run_dir}: no {SPLIT_FILE} (the run's train/validation split)")
    table = catalog.read_table(path)
    if which is not None:
        table = table[table["split"] == which].reset_index(drop=True)
    return table


def tensorboard_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / TENSORBOARD_DIR


# --- sweeps --------------------------------------------------------------------------------


def trials_dir(sweep_dir: PathLike) -> Path:
    """Where a sweep's trials keep their training runs (``trials/<trial>/``)."""
    return Path(sweep_dir) / TRIALS_DIR


def write_sweep_results(
    sweep_dir: PathLike, table: pd.DataFrame, best_config: TrainConfig, best: Path
) -> None:
    """The trials' table, the best trial's config (for ``train --config``) and its best
    checkpoint."""
    sweep_dir = Path(sweep_dir)
    table.to_csv(sweep_dir / RESULTS_FILE, index=False)
    (sweep_dir / BEST_CONFIG_FILE).write_text(yaml.safe_dump(best_config.to_dict()))
    (sweep_dir / BEST_CHECKPOINT_FILE).write_text(f"{best}\n")


def read_sweep_results(sweep_dir: PathLike) -> pd.DataFrame:
    return pd.read_csv(Path(sweep_dir) / RESULTS_FILE)


def best_config_path(sweep_dir: PathLike) -> Path:
    return Path(sweep_dir) / BEST_CONFIG_FILE
