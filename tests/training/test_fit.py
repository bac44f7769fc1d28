"""The shared Ray Train run of conftest.py on the two-node cluster: four classes, images of
sides not divisible by 32, crops, 2 workers on 2 nodes, resumed once and restored once, the run
kept in the S3-compatible test store."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ODD_W, small_run

from steelseg.runs import fetch_tensorboard, load_checkpoint, read_history, read_state
from steelseg.training.recipe import lr_factor

TRAIN_IMAGES, VAL_IMAGES = 72, 24  # of the 96 images, val_fraction 0.25


def test_two_workers_on_two_nodes_learn_all_four_classes_from_crops(trained_run):
    run_dir, _, _, _ = trained_run
    history = read_history(run_dir)
    assert history["epoch"].tolist() == [1, 2, 3]
    assert (history["nodes"] == 2).all()
    assert history["worker_pids"].map(len).eq(2).all()
    assert (history["train_images"] == TRAIN_IMAGES).all()
    assert (history["val_images"] == VAL_IMAGES).all()  # whole 48x176 images, padded
    first, last = history.iloc[0], history.iloc[-1]
    assert last["val_loss"] < first["val_loss"]
    assert last["val_dice_nonempty"] > first["val_dice_nonempty"] + 0.05
    assert last["val_kaggle_dice"] > last["val_empty_baseline"]
    for c in (1, 2, 3, 4):  # every class is in the validation split
        assert not pd.isna(last[f"val_dice_nonempty_class_{c}"])


def test_tensorboard_has_the_curves_and_the_figure(trained_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _, _ = trained_run
    events = EventAccumulator(str(fetch_tensorboard(run_dir, tmp_path))).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss_step", "loss/train", "loss/val", "lr", "val/kaggle_dice"} <= scalars
    assert {f"val/dice_class_{c}" for c in (1, 2, 3, 4)} <= scalars
    assert "val/truth_vs_prediction" in events.Tags()["images"]
    # a resume and a restore, yet every epoch once
    assert [e.value for e in events.Scalars("epoch")] == [1, 2, 3]
    figure = events.Images("val/truth_vs_prediction")[-1]
    assert figure.width == ODD_W  # whole validation images, not the training crop


def test_rerun_resumes_the_optimizer_and_schedule_where_they_stopped(trained_run):
    run_dir, before, _, _ = trained_run
    history = read_history(run_dir)
    pd.testing.assert_frame_equal(history.iloc[:1], before)  # the job's epoch is kept
    assert history["resumed_from_epoch"].tolist()[:2] == [0, 1]
    assert history["optimizer_steps"].tolist() == [9, 18, 27]  # 36 images a rank, batches of 4
    config = small_run(Path("data"), Path("runs"))
    for epoch, lr in zip(history["epoch"][1:], history["lr"][1:]):
        # the schedule of the 3-epoch run, continued at the restored step count
        expected = config.lr * lr_factor(epoch * 9, config.warmup_steps, 3 * 9)
        assert lr == pytest.approx(expected)


def test_killed_worker_is_restored_from_the_last_checkpoint(trained_run):
    run_dir, _, _, killed = trained_run
    history = read_history(run_dir)
    assert killed, "the run recorded no worker to kill"
    assert killed[0] == history["worker_pids"].iloc[1][1]  # rank 1 of epoch 2
    assert history["resumed_from_epoch"].iloc[2] == 2, "epoch 3 was not restored from epoch 2"
    assert killed[0] not in history["worker_pids"].iloc[2]


def test_rebuild_model_from_checkpoint_alone(trained_run, four_class_dir):
    run_dir, _, _, _ = trained_run
    model, loaded, state = load_checkpoint(run_dir / "epoch_0003")
    assert loaded.epochs == 3 and loaded.data == str(four_class_dir) and state["epoch"] == 3
    assert set(state) == {"model", "config", "epoch", "metrics"}  # no optimizer read to predict
    whole = read_state(run_dir / "epoch_0003")
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "config"} <= set(whole)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 160)).shape == (1, 4, 32, 160)


def test_the_run_lives_wholly_in_the_bucket(trained_run, s3):
    keys = s3.keys("runs/run/")
    checkpoints = {k.split("/")[2] for k in keys if k.endswith("/model.pt")}
    assert checkpoints == {"epoch_0001", "epoch_0002", "epoch_0003"}  # 3 kept, best and latest
    assert {"runs/run/history.jsonl", "runs/run/split.parquet"} <= set(keys)
    events = [k for k in keys if k.startswith("runs/run/tensorboard/events.out.tfevents")]
    assert len(events) >= 2  # the job's attempt and the resumed one's
    assert not any((Path(__file__).parents[2]).glob("s3*")), "a local folder named after the URI"
