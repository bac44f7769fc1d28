"""Ray Train runs on the two-node Ray cluster of conftest.py (one session for all Ray tests)."""

import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from steelseg.config import TrainConfig

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

H, W = 32, 160


def config(data: Path, storage: Path, **changes) -> TrainConfig:
    """A small, fast run on the easy set: 2 workers spread over the 2 nodes."""
    values = dict(
        data=str(data),
        storage=str(storage),
        name="run",
        epochs=3,
        batch_size=4,
        num_workers=2,
        placement_strategy="SPREAD",
        lr=2e-3,
        warmup_steps=5,
        log_images=2,
        val_fraction=0.25,
    )
    return TrainConfig(**{**values, **changes})


def test_two_worker_ddp_on_two_nodes_learns_and_logs(cluster, easy_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from steelseg.runs import read_history
    from steelseg.train import fit

    result = fit(config(easy_dir, tmp_path, epochs=4))
    assert result.error is None
    history = read_history(result.path)
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert (history["nodes"] == 2).all()
    first, last = history.iloc[0], history.iloc[-1]
    assert last["val_loss"] < first["val_loss"]
    assert last["val_dice_nonempty"] > first["val_dice_nonempty"] + 0.05
    assert last["val_images"] == 16 and last["train_images"] == 48

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss_step", "loss/train", "loss/val", "lr", "val/kaggle_dice"} <= scalars
    assert {f"val/dice_class_{c}" for c in (3, 4)} <= scalars
    assert "val/truth_vs_prediction" in events.Tags()["images"]
    assert len(events.Scalars("loss/val")) == 4

    checkpoints = sorted(p.name for p in (tmp_path / "run").glob("epoch_*"))
    assert len(checkpoints) >= 3 and "epoch_0004" in checkpoints


def test_rebuild_model_from_checkpoint_alone(cluster, easy_dir, tmp_path):
    import torch

    from steelseg.runs import load_checkpoint
    from steelseg.train import fit

    result = fit(config(easy_dir, tmp_path, epochs=1))
    model, loaded, state = load_checkpoint(result.checkpoint.path)
    assert loaded.epochs == 1 and loaded.data == str(easy_dir) and state["epoch"] == 1
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "config"} <= set(state)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, H, W)).shape == (1, 4, H, W)


def test_rerun_with_same_name_resumes_at_next_epoch(cluster, easy_dir, tmp_path):
    from steelseg.runs import read_history
    from steelseg.train import fit

    first = fit(config(easy_dir, tmp_path, epochs=1))
    assert first.metrics["epoch"] == 1
    first_history = read_history(first.path)
    second = fit(config(easy_dir, tmp_path, epochs=3))
    assert second.error is None
    history = read_history(second.path)
    assert history["epoch"].tolist() == [1, 2, 3]
    pd.testing.assert_frame_equal(history.iloc[:1], first_history)


def kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "epoch_0001").exists():
        time.sleep(0.2)
    for pid in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"RayTrainWorker" in cmdline:
            os.kill(int(pid), signal.SIGKILL)
            killed.append(int(pid))
            return


def test_killed_worker_is_restored_and_every_epoch_reported(cluster, easy_dir, tmp_path):
    from steelseg.runs import read_history
    from steelseg.train import fit

    killed = []
    killer = threading.Thread(
        target=kill_a_worker_after_first_checkpoint, args=(tmp_path / "run", killed)
    )
    killer.start()
    result = fit(config(easy_dir, tmp_path, epochs=3, max_failures=2))
    killer.join()
    assert killed, "no RayTrainWorker process was found to kill"
    assert result.error is None
    assert result.metrics["epoch"] == 3
    assert read_history(result.path)["epoch"].tolist() == [1, 2, 3]
