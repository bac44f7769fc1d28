"""A Ray Tune sweep on the easy set, without a cluster (the sweep job starts a local Ray),
the sweep in the test bucket: interrupted with SIGINT after two trials, then restored by
rerunning with the same name (sweeprun.py). Its trials train smp's U-Net (--arch
unet-resnet18); the shared run of conftest.py trains the paper's network."""

import io
import os

import pandas as pd
import pytest
from sweeprun import LRS, histories, trial_statuses

from steelseg.config import TrainConfig, read_config_file
from steelseg.errors import SteelsegError
from steelseg.storage import Location, locate
from steelseg.training.sweep import read_space_file, search_space


def read_csv(file: Location) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(file.read_bytes()))


@pytest.fixture(scope="module")
def sweep_run(background_sweep):
    """The sweep of sweeprun.py (started beside the shared train run when both are collected):
    the sweep folder, the state at its interruption and the rerun's output."""
    return background_sweep.result(timeout=1500)


def test_sweep_writes_sorted_results_and_asha_stops_the_poor_trials(sweep_run):
    sweep_dir, _, out = sweep_run
    results = read_csv(sweep_dir / "results.csv")
    assert sorted(results["lr"]) == sorted(LRS)
    assert results["error"].isna().all()  # an empty CSV field: no trial failed
    scores = results["val_kaggle_dice"].tolist()
    assert scores == sorted(scores, reverse=True)
    by_lr = results.set_index("lr")
    assert by_lr.loc[1e-6, "epochs_run"] < 2, "ASHA did not stop the trial that cannot learn"
    assert by_lr.loc[[3e-3, 1e-3], "val_kaggle_dice"].max() > by_lr.loc[1e-6, "val_kaggle_dice"]
    assert "best trial" in out and "best checkpoint:" in out


def test_best_config_and_checkpoint_files(sweep_run):
    from steelseg.runs import load_checkpoint

    sweep_dir, _, _ = sweep_run
    results = read_csv(sweep_dir / "results.csv")
    best = TrainConfig.from_dict(read_config_file((sweep_dir / "best_config.yaml").target))
    assert best.lr == pytest.approx(results["lr"].iloc[0])
    assert best.name == "sweep-best" and best.epochs == 2 and best.batch_size == 2
    assert best.arch == "unet-resnet18"  # the sweep's fixed settings are kept too
    checkpoint = locate((sweep_dir / "best_checkpoint.txt").read_text().strip(), "checkpoint")
    assert checkpoint.uri.startswith("s3://steelseg/sweeps/sweep/trials/")
    assert checkpoint.parent.name == results["trial"].iloc[0]
    model, config, state = load_checkpoint(checkpoint)
    assert config.lr == pytest.approx(best.lr) and config.arch == "unet-resnet18"
    assert sum(p.numel() for p in model.parameters()) == 14_328_644  # smp's, not the paper's
    assert state["metrics"]["val_kaggle_dice"] == pytest.approx(results["val_kaggle_dice"].iloc[0])


def test_tensorboard_has_every_trial_and_the_hparams_view(sweep_run, tmp_path):
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    from steelseg.runs import sync_tensorboard

    sweep_dir, _, _ = sweep_run
    assert sync_tensorboard(sweep_dir, tmp_path) > 0  # as `steelseg tensorboard <sweep>` does
    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path)).Reload().Runs()
    curves = [r for r in runs if r.endswith("tensorboard") and "loss/val" in runs[r]["scalars"]]
    hparams = [
        r for r in runs if r.endswith("hparams") and "hparams/val_kaggle_dice" in runs[r]["scalars"]
    ]
    assert len(curves) == 3 and len(hparams) == 3


def test_restored_sweep_keeps_finished_trials(sweep_run):
    sweep_dir, (statuses, before), out = sweep_run
    assert "restoring the sweep" in out
    finished = [trial for trial, status in statuses.items() if status == "TERMINATED"]
    assert len(finished) == 2 and len(statuses) <= 3, statuses  # interrupted mid-sweep
    after = histories(sweep_dir)
    for trial in finished:
        assert after[trial] == before[trial], f"{trial} was rerun"
    assert len(after) == 3 and set(trial_statuses(sweep_dir).values()) == {"TERMINATED"}


def test_best_config_is_a_config_the_train_job_takes(sweep_run, tmp_path):
    import argparse

    from steelseg.config import add_arguments, from_args

    sweep_dir, _, _ = sweep_run
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--config", (sweep_dir / "best_config.yaml").target, "--epochs", "5"]
    config = from_args(parser.parse_args([*argv, "--storage", str(tmp_path), "--name", "again"]))
    best = TrainConfig.from_dict(read_config_file((sweep_dir / "best_config.yaml").target))
    assert config == best.replace(epochs=5, storage=str(tmp_path), name="again")
    assert config.data and config.lr == best.lr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"learning_rate": {"uniform": [0, 1]}}, "unknown config key 'learning_rate'"),
        ({"lr": {"gaussian": [0, 1]}}, "sampler 'gaussian' is not one of"),
        ({"epochs": {"choice": [1, 2]}}, "'epochs' is set by the sweep"),
        ({"lr": [0, 1]}, "lr needs one sampler"),
        ({"lr": {"uniform": [1e-3]}}, r"lr uniform needs \[low, high\]"),
        ({"lr": {"loguniform": ["fast", 1e-2]}}, "lr takes float values, got 'fast'"),
        ({"batch_size": {"choice": [4, 4.5]}}, "batch_size takes int values, got 4.5"),
        ({"lr": {"uniform": [-1, 1]}}, "lr must be positive"),
        ({"lr": {"loguniform": [1e-4, "inf"]}}, "search space: config lr must be a finite number"),
        ({"weight_decay": {"choice": [0, "-inf"]}}, "weight_decay must be a finite number"),
        ({"dice_weight": {"uniform": [0, float("inf")]}}, "dice_weight must be a finite number"),
    ],
)
def test_bad_search_space_is_an_error(spec, message):
    with pytest.raises(SteelsegError, match=message):
        search_space(spec)


def test_tune_job_reports_a_bad_space_file_in_one_line(tmp_path, capsys):
    from ray_jobs.tune import main

    space = tmp_path / "space.yaml"
    space.write_text("lr: {loguniform: [1e-4, 1e-2]}\nlearning_rate: {uniform: [0, 1]}\n")
    assert main(["--search-space", str(space), "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown config key 'learning_rate'" in err


def test_numbers_yaml_reads_as_strings_are_numbers():
    from ray.tune.search.sample import Float

    space = search_space({"lr": {"loguniform": ["1e-4", "1e-2"]}})  # YAML: 1e-4 is a string
    assert isinstance(space["lr"], Float)
    assert (space["lr"].lower, space["lr"].upper) == (1e-4, 1e-2)


def test_a_local_ray_for_a_sweep_has_room_for_every_trials_kept_workers(monkeypatch):
    from steelseg.training.sweep import local_cpus, trial_count

    spec = {"lr": {"grid": [1e-3, 1e-4, 1e-5]}, "dice_weight": {"uniform": [0.1, 0.5]},
            "batch_size": {"grid": [2, 4]}}  # fmt: skip
    assert trial_count(spec, num_samples=2) == 12
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    base = TrainConfig(num_workers=2, cpus_per_worker=1.5)
    assert local_cpus(base, spec, num_samples=2) == 2 + 12 * 3
    assert local_cpus(TrainConfig(num_workers=1), {"lr": {"uniform": [0, 1]}}, 1) == 3


def test_the_sweep_starts_ray_with_room_for_the_kept_workers(monkeypatch, tmp_path):
    from steelseg.training import sweep as sweep_module

    asked = []

    def init_ray(num_cpus, **_):
        asked.append(num_cpus)
        raise SteelsegError("stop here")  # before Tune: only the CPUs asked for matter

    monkeypatch.setattr(sweep_module, "init_ray", init_ray)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    base = TrainConfig(storage=str(tmp_path), name="s", num_workers=1)
    with pytest.raises(SteelsegError, match="stop here"):
        sweep_module.sweep(base, {"lr": {"grid": [1e-3, 1e-4, 1e-5]}}, num_samples=1,
                           max_concurrent=1)  # fmt: skip
    assert asked == [2 + 3]  # the machine's 2 and one CPU for each of the 3 trials' workers


def test_a_trials_best_epoch_is_the_later_on_a_tie_as_its_best_checkpoint():
    from steelseg.training.sweep import best_epoch

    history = pd.DataFrame({"epoch": [1, 2, 3], "val_kaggle_dice": [0.88, 0.88, float("nan")]})
    assert best_epoch(history)["epoch"] == 2
    history.loc[2, "val_kaggle_dice"] = 0.9
    assert best_epoch(history)["epoch"] == 3
    assert best_epoch(history.iloc[:0]) is None


def test_a_space_file_with_a_bom_reads_and_one_not_text_is_one_line(tmp_path, capsys):
    from ray_jobs.tune import main

    space = tmp_path / "space.yaml"
    space.write_bytes(b"\xef\xbb\xbflr: {loguniform: [1e-4, 1e-2]}\n")
    assert read_space_file(space) == {"lr": {"loguniform": ["1e-4", "1e-2"]}}  # YAML 1.1
    space.write_bytes(b"\xff\xd8\xff\xe0 a JPEG, say")
    assert main(["--search-space", str(space), "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith(f"steelseg: error: {space}: cannot read search space (")
        and err.count("\n") == 1
    )


def test_a_sweep_whose_trials_all_failed_says_why_in_one_line(tmp_path):
    from types import SimpleNamespace

    from steelseg.storage import locate
    from steelseg.training.sweep import write_results

    sweep_dir = locate(tmp_path / "sweep", "sweep")
    failed = [
        SimpleNamespace(path=f"/elsewhere/trial_{i}", config={"lr": lr},
                        error=SteelsegError(f"training failed: /d/{i}.jpg: no such image"))
        for i, lr in enumerate((1e-3, 1e-4))
    ]  # fmt: skip
    with pytest.raises(SteelsegError) as info:
        write_results(failed, TrainConfig(), sweep_dir)
    assert str(info.value) == (
        f"{sweep_dir}: no trial finished an epoch (first error: training failed: /d/0.jpg: no "
        f"such image); see {sweep_dir / 'trials'}"
    )
    results = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert results["error"].tolist() == [str(f.error) for f in failed]
