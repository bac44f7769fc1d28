"""A second, small Ray Train run on the test cluster, after the shared one, with the options the
shared run leaves out: two imaging modalities (early fusion), the presence head, gradient
accumulation, synchronous checkpoint upload and ``--max-steps`` (it ends the run within its first
epoch); then calibrate with flip TTA and predict with a
plain threshold, the extra modality read from the sibling folder. Also ``steelseg tensorboard``
serving the shared run from the bucket, and a calibration that fails."""

import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from steelseg import runs
from steelseg.cli import main as steelseg
from steelseg.data import synth
from steelseg.model.presence import PresenceGate
from steelseg.storage import locate

IMAGES, VAL_FRACTION, BATCH, MAX_STEPS = 24, 0.25, 2, 3


@pytest.fixture(scope="module")
def fused_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fused") / "data"
    return synth.write_dataset(out, IMAGES, height=32, width=160, seed=5,
                               modalities=["visible", "ir"], processes=1)  # fmt: skip


@pytest.fixture(scope="module")
def features_run(trained_run, fused_data, tmp_path_factory):
    """`steelseg train` in this process on the test cluster (after the shared run, whose CPUs
    it would otherwise wait for): the run folder and what the command printed."""
    storage = tmp_path_factory.mktemp("features")
    argv = ["train", "--data", str(fused_data), "--storage", str(storage), "--name", "fused",
            "--modalities", "visible,ir", "--presence-head", "--grad-accum", "2",
            "--checkpoint-upload", "sync", "--epochs", "2", "--max-steps", str(MAX_STEPS),
            "--batch-size", str(BATCH),
            "--num-workers", "1", "--val-fraction", str(VAL_FRACTION), "--warmup-steps", "2",
            "--log-images", "0", "--no-calibrate"]  # fmt: skip
    assert steelseg(argv) == 0
    return locate(storage / "fused", "run")


def test_a_fused_run_with_the_presence_head_accumulates_gradients_up_to_max_steps(features_run):
    history = runs.read_history(features_run)
    train_images = len(runs.read_split(features_run, "train"))  # 19 of 24: stratified
    # 19 training images, batches of 2: 10 batches, a step every 2, 5 steps an epoch; the run
    # stops after 3, in its first epoch of 2: 6 batches, then validation and a checkpoint
    assert math.ceil(math.ceil(train_images / BATCH) / 2) > MAX_STEPS
    assert history["epoch"].tolist() == [1]
    assert history["optimizer_steps"].tolist() == [MAX_STEPS]
    assert history["train_images"].tolist() == [MAX_STEPS * 2 * BATCH]
    assert history["val_images"].tolist() == [IMAGES - train_images]
    # the schedule spans the 3 steps (not 2 epochs' 10): it ends at its floor, 1% of the peak
    assert history["lr"].iloc[-1] == pytest.approx(0.01 * 1e-3)
    assert list(runs.kept_checkpoints(features_run)) == [1]
    model, config, _ = runs.load_checkpoint(runs.resolve_checkpoint(features_run))
    assert isinstance(model, PresenceGate) and config.modalities == ["visible", "ir"]
    assert model.net.encoder.conv1.in_channels == 4  # RGB and the ir channel
    assert config.grad_accum == 2 and config.checkpoint_upload == "sync"


def test_calibrate_with_flip_tta_stores_its_rules(features_run, capsys):
    assert steelseg(["calibrate", features_run.target, "--tta", "--batch-size", "4"]) == 0
    assert "Kaggle Dice" in capsys.readouterr().out
    report = runs.read_calibration(runs.resolve_checkpoint(features_run))
    assert report["tta"] is True and report["images"] == len(runs.read_split(features_run, "val"))


@pytest.mark.parametrize(("threshold", "found"), [(1e-9, 4 * IMAGES), (0.999999, 0)])
def test_predict_with_a_plain_threshold_reads_the_sibling_modality(
    features_run, fused_data, tmp_path, capsys, threshold, found
):
    out = tmp_path / "submission.csv"
    argv = ["predict", "--checkpoint", features_run.target, "--images",
            str(fused_data / "train_images"), "--out", str(out), "--uncalibrated",
            "--threshold", str(threshold), "--no-progress"]  # fmt: skip
    assert steelseg(argv) == 0
    assert f"{IMAGES} images, {found} class masks found" in capsys.readouterr().out


def test_a_calibration_that_fails_costs_only_the_rules(features_run, fused_data, caplog):
    """The run's end calibrates in a Ray task; a failure there (here a validation image gone)
    is logged and the run stays as it is."""
    from steelseg.training.fit import calibrate_on_cluster

    best = runs.resolve_checkpoint(features_run)
    gone = runs.read_split(features_run, "val")["path"].iloc[0]
    Path(gone).unlink()
    with caplog.at_level("WARNING", logger="steelseg"):
        assert calibrate_on_cluster(best, use_gpu=False) is None
    assert f"calibration of {best.target} failed" in caplog.text and "no such image" in caplog.text


def test_steelseg_tensorboard_serves_a_bucket_run(trained_run, tmp_path):
    """Started as a user starts it, on the shared run in the bucket: a scalar read back over
    HTTP from TensorBoard, then stopped, leaving no process."""
    from raynodes import alive, descendants, end_trees, free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "steelseg", "tensorboard", trained_run.run_dir.target,
         "--port", str(port), "--cache", str(tmp_path / "cache"), "--every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    # the cache mirrors the run: its events are in the run "tensorboard"
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=tensorboard&tag=epoch"
    try:
        deadline, values = time.monotonic() + 120, None
        while values is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    values = [step[2] for step in json.load(answer)]
            except OSError:  # not serving yet
                time.sleep(1)
        assert values == [1.0, 2.0, 3.0], values
    finally:
        tree = descendants(server.pid)
        end_trees([server.pid])
        server.communicate(timeout=30)
    assert not [pid for pid in tree if alive(pid)]


def test_a_run_whose_loss_diverges_stops_in_one_line_without_a_checkpoint(
    trained_run, synth_dir, tmp_path, capsys
):
    """A learning rate of 1e30 sends the weights to infinity after the first step: the epoch
    ends, every rank sees the all-reduced loss is not finite, and the run stops there."""
    argv = ["train", "--data", str(synth_dir), "--storage", str(tmp_path), "--name", "wild",
            "--lr", "1e30", "--warmup-steps", "1", "--epochs", "3", "--batch-size", "4",
            "--crop-height", "32", "--crop-width", "160", "--num-workers", "1",
            "--log-images", "0"]  # fmt: skip
    capsys.readouterr()
    assert steelseg(argv) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        "steelseg: error: training diverged: the training loss became NaN or infinite in epoch 1,"
    ), err
    run = locate(tmp_path / "wild", "run")
    assert not runs.kept_checkpoints(run)  # nothing kept, nothing calibrated
    assert runs.read_history(run)["epoch"].tolist() == [1]
