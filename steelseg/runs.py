"""A run's files, readable without Ray: checkpoints (``epoch_NNNN/checkpoint.pt``, the model and
the whole config), the best of them, and ``history.jsonl`` (every epoch's metrics)."""

import json
import math
import os
from pathlib import Path

import pandas as pd
import torch

from steelseg.config import TrainConfig
from steelseg.errors import SteelsegError
from steelseg.training import engine

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.jsonl"
SCORE = "val_kaggle_dice"


def _read_state(path: str | os.PathLike, mmap: bool = False) -> tuple[dict, TrainConfig]:
    file = Path(path) / CHECKPOINT_FILE
    if not file.is_file():
        raise SteelsegError(f"{path}: not a steelseg checkpoint (no {CHECKPOINT_FILE})")
    state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    return state, TrainConfig.from_dict(state["config"], str(file))


def load_config(path: str | os.PathLike) -> TrainConfig:
    """The run config stored in a checkpoint, without reading its ~200 MB of tensors."""
    return _read_state(path, mmap=True)[1]


def load_checkpoint(path: str | os.PathLike) -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Rebuild the trained model from a checkpoint directory alone: (model, config, state)."""
    state, config = _read_state(path)
    model = engine.build_model(config.replace(pretrained=""))
    model.load_state_dict(state["model"])
    return model.eval(), config, state


def best_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The kept checkpoint of a run with the best val Dice (the later epoch on a tie).

    Raises:
        SteelsegError: the folder has no checkpoint or no history.
    """
    run_dir = Path(run_dir)
    kept = {
        int(p.name.split("_")[1]): p
        for p in run_dir.glob("epoch_*")
        if (p / CHECKPOINT_FILE).is_file()
    }
    if not kept:
        raise SteelsegError(f"{run_dir}: no checkpoint (no epoch_*/{CHECKPOINT_FILE})")
    history = read_history(run_dir)
    if history.empty:
        return kept[max(kept)]
    scores = history.set_index("epoch")[SCORE].fillna(-1.0).to_dict()
    return kept[max(kept, key=lambda epoch: (scores.get(epoch, -1.0), epoch))]


def append_history(run_dir: Path, metrics: dict) -> None:
    """One JSON line per epoch; undefined scores (NaN, e.g. a class absent from val) as null."""
    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()}
    with open(run_dir / HISTORY_FILE, "a") as f:
        f.write(json.dumps(clean) + "\n")


def trim_history(run_dir: Path, last_epoch: int) -> None:
    """Drop epochs after the checkpoint we resume from (a failed attempt's)."""
    kept = [m for m in _history_rows(run_dir) if m["epoch"] <= last_epoch]
    (run_dir / HISTORY_FILE).write_text("".join(json.dumps(m) + "\n" for m in kept))


def _history_rows(run_dir: Path) -> list[dict]:
    path = run_dir / HISTORY_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_history(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every epoch's metrics of a run, in order: what each epoch reported, resumes included."""
    history = pd.DataFrame(_history_rows(Path(run_dir)))
    undefined = [c for c in history.columns if history[c].isna().all()]  # a score never defined
    return history.astype(dict.fromkeys(undefined, float))
