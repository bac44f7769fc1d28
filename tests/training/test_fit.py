"""The shared Ray Train run of conftest.py on the two-node cluster: four classes, images of
sides not divisible by 32, crops, 2 workers on 2 nodes, data and run in the S3-compatible test
store; submitted with `ray job submit` (elastic), stopped with `ray job stop` and submitted
again (a resume), its second node ended mid-run (it goes on with one worker)."""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ODD_H, ODD_W, small_run

from steelseg import runs
from steelseg.errors import SteelsegError
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


def test_two_workers_on_two_nodes_learn_from_crops_of_all_four_classes(trained_run):
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
    # every class is in the validation split, so each has a defect Dice (whatever it is: three
    # epochs of 72 crops learn the large classes 3 and 4, not yet the small 1 and 2)
    split = runs.read_split(run_dir, "val")
    assert split[[f"has_{c}" for c in (1, 2, 3, 4)]].any().all()
    for c in (1, 2, 3, 4):
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
    best = best_checkpoint(trained_run.run_dir)
    assert report["images"] == VAL_IMAGES and report["checkpoint"] == best.target
    rules = load_rules(best)
    assert rules.image_size == (ODD_H, ODD_W)  # whole validation images, not the crops
    # the plain rule's score is the run's own validation score of that checkpoint: the same
    # model (rank 0's statistics), every validation image, the same threshold
    scores = read_history(trained_run.run_dir).set_index("epoch")[runs.SCORE]
    epoch = int(best.name.removeprefix("epoch_"))
    assert report["kaggle_dice_before"] == pytest.approx(scores[epoch], abs=0.002)  # bf16 noise
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
    rebuilt = model.state_dict()
    assert rebuilt.keys() == whole["model"].keys()
    for name, value in whole["model"].items():
        assert torch.equal(rebuilt[name], value), name


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
    # the best checkpoint's folder in the run, whatever path Ray gave it
    assert result.best_checkpoint == locate(tmp_path, "storage") / "demo" / "epoch_0002"
    assert calibrated == ([result.best_checkpoint] if calibrate else [])
    assert result.calibration == ({"ok": 1} if calibrate else None)


def fake_fit(monkeypatch, trainers: list | None = None):
    """``fit`` with Ray stubbed out: the trainer a ``FakeTrainer``."""
    from steelseg.training import fit as fitting

    def trainer(*args):
        made = FakeTrainer(*args)
        if trainers is not None:
            trainers.append(made)
        return made

    monkeypatch.setattr(fitting, "init_ray", lambda *args, **kwargs: "")
    monkeypatch.setattr(fitting, "check_paths_on_nodes", lambda config: None)
    monkeypatch.setattr(fitting, "build_trainer", trainer)
    return fitting


def test_a_resume_keeps_the_split_new_images_train_and_gone_ones_are_named(
    data_copy, tmp_path, monkeypatch, steelseg_log
):
    import shutil

    from steelseg.config import TrainConfig
    from steelseg.runs import read_split

    fitting = fake_fit(monkeypatch)
    config = TrainConfig(data=str(data_copy), storage=str(tmp_path / "runs"), calibrate=False)
    first = read_split(fitting.fit(config).run_dir)
    val = first.loc[first["split"] == "val", "image_id"].tolist()
    gone = val[0]
    (data_copy / "train_images" / gone).unlink()
    with open(data_copy / "train.csv") as f:  # its rows go with it
        rows = [line for line in f if not line.startswith(gone)]
    (data_copy / "train.csv").write_text("".join(rows))
    for name in ("00000new1.jpg", "00000new2.jpg"):
        shutil.copy(data_copy / "train_images" / val[1], data_copy / "train_images" / name)
    steelseg_log.clear()
    again = read_split(fitting.fit(config).run_dir)
    by_image = dict(zip(again["image_id"], again["split"]))
    assert sorted(k for k, v in by_image.items() if v == "val") == sorted(val[1:])
    assert by_image["00000new1.jpg"] == by_image["00000new2.jpg"] == "train"
    assert gone not in by_image
    assert "info: 2 image(s) new since the run's split: they train, never validate" in steelseg_log
    assert any(line.startswith("warning: image(s) of the run's split gone") and gone in line
               for line in steelseg_log)  # fmt: skip


def spy():
    """``catalog.inspect_many`` that records whether each call decoded the images."""
    from steelseg.data import catalog

    decoded = []

    def inspect(paths, decode):
        decoded.append(decode)
        inspect.paths.append(len(paths))
        return catalog.inspect_many(paths, decode)

    inspect.paths = []  # how many images each call read
    return inspect, decoded


def test_the_images_are_decoded_in_full_once_until_the_data_set_changes(data_copy, tmp_path):
    import os

    from steelseg.config import TrainConfig
    from steelseg.training.fit import load_split

    config = TrainConfig(data=str(data_copy), storage=str(tmp_path / "runs"))
    inspect, decoded = spy()
    first = load_split(config, inspect=inspect)
    second = load_split(config, inspect=inspect)  # a resume, or a rerun of the run
    assert decoded == [True]  # the record gives the size: not even a header is read again
    for a, b in zip(first, second):
        pd.testing.assert_frame_equal(a, b)
    assert first[0]["grey"].all()  # synthetic images are grey stored as RGB, as Severstal's
    load_split(config.replace(name="another"), inspect=inspect)  # a new run on the same data
    assert decoded == [True]
    image = next((data_copy / "train_images").iterdir())
    os.utime(image, ns=(0, 0))  # changed since the check
    load_split(config, inspect=inspect)
    assert decoded == [True, True]
    # a colour image makes the data set colour: its images keep their three channels
    from PIL import Image

    pixels = np.asarray(Image.open(image).convert("RGB")).copy()
    pixels[:4, :4] = (255, 0, 0)
    Image.fromarray(pixels).save(image, format="JPEG", quality=95)
    train, val = load_split(config, inspect=inspect)
    assert decoded == [True, True, True] and not train["grey"].any() and not val["grey"].any()
    train, _ = load_split(config, inspect=inspect)  # the record says so too
    assert len(decoded) == 3 and not train["grey"].any()


def test_a_record_without_the_size_costs_the_headers_once_and_gains_the_size(data_copy, tmp_path):
    """A check recorded before the size was kept is trusted with a header read, which writes
    the size into it, so the next start reads nothing."""
    from steelseg import runs
    from steelseg.config import TrainConfig
    from steelseg.training.fit import load_split

    config = TrainConfig(data=str(data_copy), storage=str(tmp_path / "runs"))
    inspect, decoded = spy()
    first = load_split(config, inspect=inspect)
    run_dir = config.resolved().run_dir
    old = runs.read_data_check(run_dir)
    oldest = {k: old[k] for k in ("fingerprint", "images", "dropped")}  # no grey, no size
    (run_dir / runs.DATA_CHECK_FILE).write_text(json.dumps(oldest))
    shared = tmp_path / "runs" / runs.DATA_CHECKS_DIR
    for record in shared.rglob(runs.DATA_CHECK_FILE):
        record.unlink()  # only the run's old record is left
    second = load_split(config, inspect=inspect)
    size = [int(first[0]["height"].iloc[0]), int(first[0]["width"].iloc[0])]
    assert decoded == [True, False] and runs.read_data_check(run_dir)["size"] == size
    load_split(config, inspect=inspect)
    assert decoded == [True, False]
    for a, b in zip(first, second):  # a record without grey: not known grey, read in RGB
        assert not b["grey"].any()
        pd.testing.assert_frame_equal(a.drop(columns="grey"), b.drop(columns="grey"))


def test_a_sweeps_trials_trust_its_check_and_keep_only_the_images_it_passed(data_copy, tmp_path):
    from steelseg.config import TrainConfig
    from steelseg.storage import locate
    from steelseg.training.fit import checked_table, data_folder, load_split

    truncated = sorted((data_copy / "train_images").iterdir())[0]
    truncated.write_bytes(truncated.read_bytes()[:500])  # only a full decode finds it
    sweep = locate(tmp_path / "sweep", "sweep")
    base = TrainConfig(data=str(data_copy), storage=str(tmp_path), name="sweep", drop_bad=True)
    inspect, decoded = spy()
    checked_table(base, data_folder(base), inspect, (sweep,))  # the sweep's driver, once
    trial = base.replace(storage=str(tmp_path / "sweep" / "trials"), name="t1")
    train, val = load_split(trial, inspect=inspect, checks=(sweep,))
    assert decoded == [True, False] and inspect.paths == [60, 1]  # the dropped image's header
    assert truncated.name not in set(train["image_id"]) | set(val["image_id"])
    assert len(train) + len(val) == 59
    strict = trial.replace(drop_bad=False, name="t2")  # a check that dropped one is no pass
    with pytest.raises(SteelsegError, match=truncated.name):
        load_split(strict, inspect=inspect, checks=(sweep,))


def test_a_sweep_after_a_run_on_its_storage_decodes_nothing_nor_do_its_trials(data_copy, tmp_path):
    """A run checked the data set; a sweep in the same storage trusts that check, and so do
    its trials, though the sweep made no record of its own."""
    from steelseg import runs
    from steelseg.config import TrainConfig
    from steelseg.training.fit import checked_table, data_folder, load_split
    from steelseg.training.sweep import trial_checks

    inspect, decoded = spy()
    run = TrainConfig(data=str(data_copy), storage=str(tmp_path), name="run")
    load_split(run, inspect=inspect)  # the run: the one full check
    base = run.replace(name="sweep")
    sweep_dir = base.resolved().run_dir
    checked_table(base, data_folder(base), inspect, trial_checks(base, sweep_dir))  # the driver
    assert runs.read_data_check(sweep_dir) is None  # it trusted the storage's record
    trial = base.replace(storage=runs.trials_dir(sweep_dir).target, name="t1")
    train, val = load_split(trial, inspect=inspect, checks=trial_checks(base, sweep_dir))
    assert decoded == [True] and len(train) + len(val) == 60


def test_a_failed_run_keeps_its_checkpoints_and_names_the_best(tmp_path):
    from steelseg import runs
    from steelseg.config import TrainConfig
    from steelseg.training.fit import failed

    config = TrainConfig(storage=str(tmp_path), name="r")
    for epoch, score in ((1, 0.9), (2, 0.8)):
        runs.write_state(config.run_dir / f"epoch_{epoch:04d}", {"model": {}, "epoch": epoch})
        runs.append_history(config.run_dir, {"epoch": epoch, "val_kaggle_dice": score})
    result = failed(config, "training failed: x")
    assert str(result.error) == "training failed: x" and result.calibration is None
    assert result.best_checkpoint.name == "epoch_0001"
    assert sorted(runs.kept_checkpoints(config.run_dir)) == [1, 2]


def test_the_reason_of_a_failed_run_is_the_workers_own_error_on_one_line():
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    from steelseg.training.fit import failure_reason

    mine = SteelsegError("s3://b/d/train_images/a.jpg: no such image")
    wrapped = RayTaskError("read_batch", "Traceback (most recent call last):\n  ...", mine)
    try:
        raise RuntimeError("Ray Data: a task failed") from wrapped
    except RuntimeError as e:
        data_error = e
    error = WorkerGroupError("Worker 1 failed:\nTraceback ...", {1: ValueError("x"),
                                                                    0: data_error})  # fmt: skip
    assert failure_reason(error) == "s3://b/d/train_images/a.jpg: no such image"
    # the error as Ray Data's task raised it again, with its note on retries appended
    note = "Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\nTo change"
    noted = SteelsegError(f"/d/a.jpg: no such image\n{note} retry attempts, ... transient.")
    assert failure_reason(WorkerGroupError("...", {0: noted})) == "/d/a.jpg: no such image"
    other = WorkerGroupError("...", {0: ZeroDivisionError("division by zero")})
    assert failure_reason(other) == "ZeroDivisionError: division by zero"
    assert failure_reason(ControllerError(KeyError("k"))) == "KeyError: 'k'"
    # a Ray Data task's error, as a worker gets it: its traceback as text
    task = RayTaskError("MapBatches(read_batch)", TRACEBACK, RuntimeError("UDF failed"))
    assert failure_reason(WorkerGroupError("...", {0: task})) == "/d/a.jpg: no such image"
    ours = "steelseg.errors.SteelsegError: /d/a.jpg: no such image"
    text_only = TRACEBACK.replace(ours, "PIL.UnidentifiedImageError: cannot identify /d/a.jpg")
    task = RayTaskError("MapBatches(read_batch)", text_only, RuntimeError("UDF failed"))
    assert failure_reason(WorkerGroupError("...", {0: task})) == (
        "UnidentifiedImageError: cannot identify /d/a.jpg"
    )


TRACEBACK = """Traceback (most recent call last):
  File "steelseg/data/images.py", line 51, in read_image
    raise SteelsegError(f"{path}: no such image") from None
steelseg.errors.SteelsegError: /d/a.jpg: no such image

The above exception was the direct cause of the following exception:

ray::MapBatches(read_batch)()
ray.exceptions.UserCodeException: UDF failed to process a data block.
Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s)."""


def test_a_run_whose_worker_fails_ends_in_one_line_naming_the_workers_error(
    trained_run, data_copy, tmp_path, monkeypatch, capsys
):
    """`steelseg train` on the test cluster (after the shared run, whose CPUs it would wait
    for), an image lost after the data set was checked: the worker's read fails, Ray Train
    raises TrainingFailedError, and the command says what the worker said, in one line."""
    from steelseg.cli import main
    from steelseg.training import fit as fitting

    lost = sorted((data_copy / "train_images").iterdir())[0]
    build = fitting.build_trainer

    def build_and_lose_an_image(*args):
        lost.unlink()
        return build(*args)

    monkeypatch.setattr(fitting, "build_trainer", build_and_lose_an_image)
    argv = ["train", "--data", str(data_copy), "--storage", str(tmp_path), "--name", "failing",
            "--epochs", "1", "--num-workers", "1", "--max-failures", "0", "--batch-size", "4",
            "--crop-height", "32", "--crop-width", "160"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 1
    assert capsys.readouterr().err == f"steelseg: error: training failed: {lost}: no such image\n"


def test_a_ranks_batches_of_an_epoch_are_the_same_in_every_run(cluster, synth_dir):
    """Ray Data on the test cluster: a run's one dataset of epochs 2 and 3, and a run resumed at
    epoch 3, read the same images in the same order with the same crops at epoch 3 (as does a
    run of epoch 2 alone at 2); another epoch differs; the two ranks together read every image
    exactly once an epoch; nothing is left after the run's last epoch."""
    import ray.data

    from steelseg.config import TrainConfig
    from steelseg.data import catalog, pipeline

    table = catalog.load(synth_dir, decode_images=False)
    config = TrainConfig(crop_height=32, crop_width=160, seed=3)
    context = ray.data.DataContext.get_current()
    kept = (context.execution_options.preserve_order, context.enable_progress_bars)
    try:
        pipeline.ordered_context()

        def read(epochs, rank=1):
            run = {e: pipeline.train_samples(60, config.seed, e, rank, world=2) for e in epochs}
            dataset = pipeline.train_dataset(table, run, config)
            blocks = iter(dataset.iter_batches(batch_size=None))
            read = {e: list(pipeline.epoch_batches(blocks, len(p), 4, e)) for e, p in run.items()}
            assert next(blocks, None) is None
            return read

        run, resumed, first = read([2, 3]), read([3]), read([2])
        rank_0 = read([2], rank=0)
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = kept
    assert [len(b["image"]) for b in run[2]] == [4] * 7 + [2]  # half of 60, in batches of 4
    seen = np.concatenate([b["sample"] for b in run[2] + rank_0[2]])
    assert sorted(seen.tolist()) == list(range(60))  # every row of the table, once
    for a, b in [*zip(run[3], resumed[3], strict=True), *zip(run[2], first[2], strict=True)]:
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(run[2], run[3]))
    # each row cropped as its own seed, epoch and place in the table say, whatever its batch:
    # the first 4 rows read and augmented here, in this process
    from steelseg.data.augment import augment_batch

    rows = pipeline.train_rows(table, config.seed, 3, rank=1, world=2).iloc[:4]
    batch = pipeline.read_batch({c: rows[c].to_numpy() for c in rows}, config.modalities)
    expected = augment_batch({**batch, "sample": rows.index.to_numpy()}, 32, 160, 3, epoch=3)
    np.testing.assert_array_equal(run[3][0]["image"], expected["image"])


def test_an_epoch_comes_in_blocks_of_whole_batches_a_task_reading_several(
    cluster, synth_dir, monkeypatch
):
    """The cut ``pipeline.blocks`` plans is what Ray Data runs: a block per part a task
    augments (not one per task, Ray's default for blocks under its target size) and a task per
    planned share of an epoch, never one spanning two epochs (an epoch's last chunk of 1 row
    stays its own); the consumer gets every row once, and the same batches whatever the cut (a
    run resumed on another cluster shape reads the same epoch)."""
    import re

    import ray.data

    from steelseg.config import TrainConfig
    from steelseg.data import catalog, pipeline

    table = catalog.load(synth_dir, decode_images=False)  # 60 images of 64x320
    config = TrainConfig(crop_height=32, crop_width=160, batch_size=4)
    monkeypatch.setattr(pipeline, "TASK_PIXELS", 24 * 64 * 320)  # 24 images a task at most
    monkeypatch.setattr(pipeline, "BLOCK_BYTES", 2 * 4 * 32 * 160 * 2)  # 2 grey batches
    cut = pipeline.train_blocks(table, config, grey=True, cpus=1)
    assert cut.task == 24 and cut.block == 8  # 3 tasks of 20 -> 24 (3 blocks), the last 12
    context = ray.data.DataContext.get_current()
    kept = (context.execution_options.preserve_order, context.target_max_block_size)
    try:
        pipeline.ordered_context()
        dataset = pipeline.train_dataset(table, {0: np.arange(60)}, config, grey=True, cpus=1)
        blocks = list(dataset.iter_batches(batch_size=None))
        assert context.target_max_block_size == kept[1]  # the dataset's own, not the process's
        other = pipeline.train_dataset(table, {0: np.arange(60)}, config, grey=True, cpus=8)
        batches = list(other.iter_batches(batch_size=4))
        # two epochs of 49 rows: tasks of 24, 24 and 1 each
        two = pipeline.train_dataset(table, {0: np.arange(49), 1: np.arange(49)}, config, True)
        two_blocks = [
            (int(b["epoch"][0]), len(b["epoch"])) for b in two.iter_batches(batch_size=None)
        ]
    finally:
        context.execution_options.preserve_order = kept[0]
    assert [len(b["sample"]) for b in blocks] == [8] * 7 + [4]
    assert blocks[0]["image"].shape == (8, 32, 160, 1)
    assert sorted(np.concatenate([b["sample"] for b in blocks]).tolist()) == list(range(60))
    assert re.search(r"MapBatches\(train_task\): 3 tasks executed, 8 blocks", dataset.stats())
    # 8 CPUs: 8 tasks (one a CPU) of 8, the same images in order
    assert pipeline.train_blocks(table, config, grey=True, cpus=8).task == 8
    np.testing.assert_array_equal(
        np.concatenate([b["image"] for b in batches]),
        np.concatenate([b["image"] for b in blocks]),
    )
    assert two_blocks == [(0, 8)] * 6 + [(0, 1)] + [(1, 8)] * 6 + [(1, 1)]


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


OOM_TEXT = (
    "Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.2, "
    "ID: 1a2b) where the task (actor ID: 3c4d, name=TrainController.__init__, pid=812) was "
    "running was 22.10GB / 23.26GB (0.950083), and the memory usage threshold of 0.95 was "
    "exceeded. Ray killed this worker (ID: 5e6f) because it was the most recently scheduled."
)


def test_a_run_whose_controller_ray_kills_for_memory_fails_with_one_line(
    synth_dir, tmp_path, monkeypatch
):
    """Ray's memory monitor ends the Train controller: ``fit`` raises no traceback, it returns
    the run as failed, with the node's memory figures on one line."""
    from ray.exceptions import ActorDiedError, OutOfMemoryError
    from ray.train import WorkerGroupError

    from steelseg.config import TrainConfig
    from steelseg.training.fit import failure_reason

    fitting = fake_fit(monkeypatch)

    def killed(self):
        raise OutOfMemoryError(OOM_TEXT)

    monkeypatch.setattr(FakeTrainer, "fit", killed)
    config = TrainConfig(data=str(synth_dir), storage=str(tmp_path), calibrate=False)
    result = fitting.fit(config)
    reason = str(result.error)
    assert reason == (
        "training failed: Ray killed a process because its node ran low on memory "
        "(22.10GB / 23.26GB in use): lower --batch-size or give each worker more of a node "
        "(--cpus-per-worker)"
    )
    assert result.best_checkpoint is None and "\n" not in reason
    # a worker that Ray's memory monitor ended, as Ray Train reports it
    worker = WorkerGroupError("Worker 0 failed", {0: OutOfMemoryError(OOM_TEXT)})
    assert failure_reason(worker) == reason.removeprefix("training failed: ")
    # an actor that died another way: its message's first line
    died = ActorDiedError()
    assert failure_reason(died) == f"ActorDiedError: {str(died).splitlines()[0].strip()}"
