"""The shared Ray Train run of conftest.py on the two-node cluster: four classes, images of
sides not divisible by 32, crops, 2 workers on 2 nodes, data and run in the S3-compatible test
store; submitted with `ray job submit` (elastic), stopped with `ray job stop` and submitted
again (a resume), its second node ended mid-run (it goes on with one worker)."""

import io
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import ODD_W, small_run

from steelseg.runs import (
    best_checkpoint,
    fetch_tensorboard,
    load_checkpoint,
    load_rules,
    read_history,
    read_state,
)
from steelseg.storage import locate
from steelseg.training.recipe import lr_factor

TRAIN_IMAGES, VAL_IMAGES = 72, 24  # of the 96 images, val_fraction 0.25


def test_two_workers_on_two_nodes_learn_all_four_classes_from_crops(trained_run):
    run_dir = trained_run.run_dir
    history = read_history(run_dir)
    assert history["epoch"].tolist() == [1, 2, 3]
    # epoch 3 on the one node left (elastic), the others on two
    assert history["nodes"].tolist() == [2, 2, 1]
    assert history["worker_pids"].map(len).tolist() == [2, 2, 1]
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

    run_dir = trained_run.run_dir
    events = EventAccumulator(str(fetch_tensorboard(run_dir, tmp_path))).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss_step", "loss/train", "loss/val", "lr", "val/kaggle_dice"} <= scalars
    assert {f"val/dice_class_{c}" for c in (1, 2, 3, 4)} <= scalars
    assert "val/truth_vs_prediction" in events.Tags()["images"]
    # where each epoch's time went, and each checkpoint's (every epoch once, as below)
    for phase in ("data_wait", "step", "validate", "checkpoint"):
        values = [e.value for e in events.Scalars(f"time/{phase}")]
        assert len(values) == 3 and all(v > 0 for v in values), (phase, values)
    # a resume and a restore, yet every epoch once
    assert [e.value for e in events.Scalars("epoch")] == [1, 2, 3]
    figure = events.Images("val/truth_vs_prediction")[-1]
    assert figure.width == ODD_W  # whole validation images, not the training crop


def test_rerun_resumes_the_optimizer_and_schedule_where_they_stopped(trained_run):
    run_dir, before = trained_run.run_dir, trained_run.before
    history = read_history(run_dir)
    pd.testing.assert_frame_equal(history.iloc[:1], before)  # the stopped job's epoch is kept
    # 72 images, batches of 4: 9 steps a rank on 2 workers, 18 on 1 (epoch 3)
    assert history["optimizer_steps"].tolist() == [9, 18, 36]
    config = small_run(Path("data"), Path("runs"))
    for epoch, lr, workers in zip(history["epoch"], history["lr"], history["worker_pids"].map(len)):
        # the schedule of the 3-epoch run, at the end of the epoch in that epoch's steps
        steps = 18 // workers
        assert lr == pytest.approx(config.lr * lr_factor(epoch * steps, config.warmup_steps,
                                                         3 * steps)), epoch  # fmt: skip


def test_a_node_that_goes_away_leaves_the_run_on_the_others_from_the_last_checkpoint(trained_run):
    from conftest import RESUMED

    history, ended = read_history(trained_run.run_dir), trained_run.ended_node
    assert set(history["worker_pids"].iloc[1]) & set(ended), "no worker of epoch 2 was on it"
    assert history["resumed_from_epoch"].iloc[2] == 2, "epoch 3 was not restored from epoch 2"
    assert not set(history["worker_pids"].iloc[2]) & set(ended)
    status, logs = trained_run.submitted[RESUMED]
    assert status == "SUCCEEDED" and "finished epoch 3: val Dice" in logs  # it finished


def test_stopped_job_submitted_again_resumes_from_its_last_checkpoint(trained_run):
    from conftest import RESUMED, STOPPED

    history = read_history(trained_run.run_dir)
    (stopped, stopped_logs), (finished, logs) = (
        trained_run.submitted[STOPPED],
        trained_run.submitted[RESUMED],
    )
    assert (stopped, finished) == ("STOPPED", "SUCCEEDED")
    assert "epoch 1/3: train loss" in stopped_logs and "epoch 2/3" not in stopped_logs
    # `ray job stop` sends SIGTERM: the job ends the run as on Ctrl-C, giving its resources
    # back at once (the resubmission would otherwise wait minutes for Ray to release them)
    assert "stop requested (SIGTERM): ending the run cleanly" in stopped_logs
    assert history["resumed_from_epoch"].tolist() == [0, 1, 2]
    assert not set(history["worker_pids"].iloc[1]) & set(history["worker_pids"].iloc[0])
    # `ray job logs` of the second submission: its epochs only, its end and the run's place
    assert "epoch 2/3: train loss" in logs and "epoch 3/3: train loss" in logs
    assert "epoch 1/3" not in logs and "finished epoch 3: val Dice" in logs
    assert f"run:         {trained_run.run_dir.target}" in logs


def test_the_finished_run_calibrated_its_best_checkpoint(trained_run):
    from conftest import RESUMED

    report = trained_run.calibration  # stored in the bucket, beside the best checkpoint
    assert report["images"] == VAL_IMAGES and load_rules(best_checkpoint(trained_run.run_dir))
    assert report["kaggle_dice_after"] >= report["kaggle_dice_before"]
    _, logs = trained_run.submitted[RESUMED]
    before, after = report["kaggle_dice_before"], report["kaggle_dice_after"]
    told = f"calibrated:  val Dice {before:.4f} -> {after:.4f} on {VAL_IMAGES} images"
    assert told in logs
    assert "steelseg calibrate" not in logs  # not among the next commands: it is done


def test_rebuild_model_from_checkpoint_alone(trained_run, four_class_uri):
    run_dir = trained_run.run_dir
    model, loaded, state = load_checkpoint(run_dir / "epoch_0003")
    assert loaded.epochs == 3 and state["epoch"] == 3
    assert loaded.data == locate(four_class_uri, "data").target  # the bucket, its endpoint
    assert set(state) == {"model", "config", "epoch", "metrics"}  # no optimizer read to predict
    whole = read_state(run_dir / "epoch_0003")
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "config"} <= set(whole)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 160)).shape == (1, 4, 32, 160)


def test_the_run_lives_wholly_in_the_bucket(trained_run, s3):
    keys = s3.keys("runs/run/")
    checkpoints = {k.split("/")[2] for k in keys if k.endswith("/model.pt")}
    assert len(checkpoints) == 2 and "epoch_0003" in checkpoints  # 2 kept, the best and latest
    assert {"runs/run/history.jsonl", "runs/run/split.parquet"} <= set(keys)
    events = [k for k in keys if k.startswith("runs/run/tensorboard/events.out.tfevents")]
    assert len(events) >= 3  # the first job's, the submitted job's and its resubmission's
    assert not any((Path(__file__).parents[2]).glob("s3*")), "a local folder named after the URI"
    split = pd.read_parquet(io.BytesIO(s3.read("runs/run/split.parquet")))
    assert split["path"].str.startswith("s3://steelseg/data/four/train_images/").all()


class FakeTrainer:
    """What ``fit`` asks of a TorchTrainer, without Ray: its tables, and a result whose best
    checkpoint is epoch 2."""

    def __init__(self, config, train_table, val_table, callbacks, relay):
        self.train_table, self.error = train_table, None

    def fit(self):
        best = SimpleNamespace(path="/elsewhere/epoch_0002")
        return SimpleNamespace(
            best_checkpoints=[best], metrics={}, error=self.error,
            get_best_checkpoint=lambda metric, mode: best,
        )  # fmt: skip


@pytest.mark.parametrize("calibrate", [True, False])
def test_fit_trains_on_the_oversampled_split_keeps_the_split_and_calibrates_the_best(
    synth_dir, tmp_path, monkeypatch, calibrate
):
    from steelseg.config import TrainConfig
    from steelseg.data.sampling import oversample
    from steelseg.runs import read_split
    from steelseg.training import fit as fitting

    trainers, calibrated = [], []

    def trainer(*args):
        trainers.append(FakeTrainer(*args))
        return trainers[-1]

    monkeypatch.setattr(fitting, "init_ray", lambda *args, **kwargs: "")
    monkeypatch.setattr(fitting, "check_paths_on_nodes", lambda config: None)
    monkeypatch.setattr(fitting, "build_trainer", trainer)
    monkeypatch.setattr(
        fitting, "calibrate_on_cluster", lambda best, gpu: calibrated.append(best) or {"ok": 1}
    )
    config = TrainConfig(
        data=str(synth_dir), storage=str(tmp_path), rare_share=0.3, calibrate=calibrate
    )
    result = fitting.fit(config)
    train = read_split(result.run_dir, "train")  # the split as it is, each image once
    assert train["image_id"].is_unique
    epoch_table = trainers[0].train_table
    assert len(epoch_table) == len(oversample(train, 0.3)) > len(train)
    assert result.best_checkpoint.name == "epoch_0002"
    assert calibrated == ([result.best_checkpoint] if calibrate else [])
    assert result.calibration == ({"ok": 1} if calibrate else None)


def test_a_data_set_without_a_defect_is_warned_of_before_training(
    data_copy, tmp_path, steelseg_log
):
    from steelseg.config import TrainConfig
    from steelseg.training.fit import load_split

    config = TrainConfig(data=str(data_copy), storage=str(tmp_path))
    load_split(config)
    assert steelseg_log == []
    (data_copy / "train.csv").write_text("ImageId,ClassId,EncodedPixels\n")
    train, val = load_split(config)
    assert len(train) + len(val) == 60
    assert steelseg_log == [
        f"warning: {data_copy}: none of the 60 images has a defect (no train.csv row with "
        "EncodedPixels): there is nothing to learn but predicting no defect"
    ]
