"""A run's files without Ray: the history, the choice of the best checkpoint, the rules stored
with a checkpoint and the split."""

import io
import math

import pytest
import torch

from steelseg.errors import SteelsegError
from steelseg.inference.postprocess import ClassRule, Rules
from steelseg.runs import (
    MODEL_FILE,
    append_history,
    best_checkpoint,
    load_rules,
    read_calibration,
    read_history,
    read_split,
    resolve_checkpoint,
    save_rules,
    trim_history,
)


def write_run(run_dir, scores: dict[int, float], kept: list[int]):
    run_dir.mkdir(parents=True, exist_ok=True)
    for epoch, score in scores.items():
        append_history(run_dir, {"epoch": epoch, "val_kaggle_dice": score, "worker_pids": [1, 2]})
    for epoch in kept:
        folder = run_dir / f"epoch_{epoch:04d}"
        folder.mkdir()
        (folder / MODEL_FILE).write_bytes(b"")
    return run_dir


def test_best_checkpoint_is_the_best_kept_epoch_and_the_later_one_on_a_tie(tmp_path):
    run = write_run(tmp_path / "a", {1: 0.80, 2: 0.90, 3: 0.90, 4: 0.95}, kept=[2, 3])
    assert best_checkpoint(run).name == "epoch_0003"  # epoch 4 scored best but was not kept
    run = write_run(tmp_path / "b", {1: 0.9, 2: math.nan}, kept=[1, 2])
    assert best_checkpoint(run).name == "epoch_0001"  # an undefined score ranks last
    with pytest.raises(SteelsegError, match="no checkpoint"):
        best_checkpoint(write_run(tmp_path / "c", {1: 0.5}, kept=[]))


def test_a_checkpoints_model_file_resolves_to_its_folder_and_another_file_is_named(tmp_path):
    run = write_run(tmp_path / "run", {1: 0.8, 2: 0.9}, kept=[1, 2])
    assert resolve_checkpoint(run / "epoch_0001" / MODEL_FILE).path == str(run / "epoch_0001")
    assert resolve_checkpoint(run / "epoch_0001").path == str(run / "epoch_0001")
    assert resolve_checkpoint(run).path == str(run / "epoch_0002")
    with pytest.raises(SteelsegError) as info:
        resolve_checkpoint(run / "history.jsonl")
    assert str(info.value) == (
        f"{run / 'history.jsonl'}: a file; give a checkpoint (its folder or its model.pt), a run "
        "or a sweep"
    )


def test_trim_history_drops_the_epochs_after_the_restored_checkpoint(tmp_path):
    run = write_run(tmp_path / "a", {1: 0.8, 2: 0.85, 3: 0.9}, kept=[])
    trim_history(run, 2)
    history = read_history(run)
    assert history["epoch"].tolist() == [1, 2]
    assert history["worker_pids"].tolist() == [[1, 2], [1, 2]]  # list columns read back as lists
    trim_history(run, 0)
    assert read_history(run).empty


def test_rules_round_trip_through_the_checkpoint_folder(tmp_path):
    rules = Rules((ClassRule(0.4, 30, 5, 0.8),) + (ClassRule(),) * 3, image_size=(32, 160))
    save_rules(tmp_path, rules, {"kaggle_dice_after": 0.9})
    assert load_rules(tmp_path) == rules
    assert read_calibration(tmp_path) == {"kaggle_dice_after": 0.9}
    assert load_rules(tmp_path / "nothing") is None


def test_a_run_without_a_split_is_a_one_line_error(tmp_path):
    with pytest.raises(SteelsegError, match=r"no split.parquet \(the run's train/validation"):
        read_split(tmp_path)


def test_tensorboard_sync_copies_only_what_changed(s3, tmp_path):
    from steelseg.runs import sync_tensorboard
    from steelseg.storage import locate

    run = locate(s3.uri("sync/run"), "run")
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"first")
    (run / "tensorboard" / "hparams" / "events.out.tfevents.2").write_bytes(b"hp")
    (run / "history.jsonl").write_text("{}\n")  # not an event file: not copied
    cache = tmp_path / "cache"
    assert sync_tensorboard(run, cache) == 2
    assert (cache / "tensorboard" / "events.out.tfevents.1").read_bytes() == b"first"
    assert not (cache / "history.jsonl").exists()
    assert sync_tensorboard(run, cache) == 0
    (run / "tensorboard" / "events.out.tfevents.1").write_bytes(b"first, then more")
    assert sync_tensorboard(run, cache) == 1
    assert (cache / "tensorboard" / "events.out.tfevents.1").read_bytes() == b"first, then more"


def test_upload_creates_the_local_folder_it_copies_into(tmp_path):
    from steelseg.storage import locate

    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "sub" / "events.1").write_bytes(b"x")
    target = locate(tmp_path / "run" / "tensorboard" / "hparams", "run")
    target.upload(staging)
    assert (tmp_path / "run" / "tensorboard" / "hparams" / "sub" / "events.1").read_bytes() == b"x"


def torch_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


WHOLE = torch_bytes({"model": {}, "config": {"lr": 0.01}, "epoch": 1, "metrics": {}})
NOT_OURS = "not a steelseg checkpoint"
BROKEN_CHECKPOINTS = {
    "random bytes": (bytes(range(256)) * 4, f"{NOT_OURS} (not a file torch.save writes)"),
    "empty": (b"", f"{NOT_OURS} (not a file torch.save writes)"),
    "cut short": (
        WHOLE[: len(WHOLE) // 2],
        "cannot read the checkpoint (RuntimeError: PytorchStreamReader failed reading zip "
        "archive: failed finding central directory)",
    ),
    "a state_dict": (
        torch_bytes({"conv1.weight": torch.zeros(1)}),
        f"{NOT_OURS} (no model, config)",
    ),
    "a tensor": (torch_bytes(torch.zeros(2)), f"{NOT_OURS} (no model, config)"),
    "config not a dict": (
        torch_bytes({"model": {}, "config": "lr=0.1"}),
        f"{NOT_OURS} (its config is a str)",
    ),
    "unknown config key": (
        torch_bytes({"model": {}, "config": {"lrr": 0.1}}),
        "unknown config key(s) lrr",
    ),
    "config value of the wrong type": (
        torch_bytes({"model": {}, "config": {"lr": "fast"}}),
        "config lr must be float, got 'fast'",
    ),
    "config value out of range": (
        torch_bytes({"model": {}, "config": {"lr": -1.0}}),
        "config lr must be positive, got -1.0",
    ),
}


@pytest.mark.parametrize("command", ["predict", "calibrate"])
@pytest.mark.parametrize("case", BROKEN_CHECKPOINTS)
def test_a_broken_checkpoint_is_one_line_naming_the_file_before_ray_starts(
    tmp_path, monkeypatch, capsys, case, command
):
    from steelseg.cli import main
    from steelseg.inference import predict

    def init_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(predict, "init_ray", init_ray)
    content, message = BROKEN_CHECKPOINTS[case]
    folder = tmp_path / "run" / "epoch_0001"
    folder.mkdir(parents=True)
    (folder / MODEL_FILE).write_bytes(content)
    argv = {
        "predict": ["predict", "--checkpoint", str(folder), "--images", str(tmp_path)],
        "calibrate": ["calibrate", str(tmp_path / "run")],
    }[command]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"steelseg: error: {folder / MODEL_FILE}: {message}\n"


def test_weights_that_do_not_fit_the_config_are_one_line_naming_the_file(tmp_path, capsys):
    from steelseg.cli import main
    from steelseg.config import TrainConfig

    state = {"model": {"w": torch.zeros(1)}, "config": TrainConfig().to_dict(), "epoch": 1}
    (tmp_path / MODEL_FILE).write_bytes(torch_bytes({**state, "metrics": {}}))
    assert main(["calibrate", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        f"steelseg: error: {tmp_path / MODEL_FILE}: the weights do not fit the model of its config "
        "(RuntimeError: Error(s) in loading state_dict for UNet: Missing key(s) in state_dict:"
    )
    assert err.count("\n") == 1


def test_a_resume_from_a_broken_training_state_names_the_file(tmp_path):
    from steelseg.runs import TRAINING_FILE, read_state

    (tmp_path / MODEL_FILE).write_bytes(WHOLE)
    training = torch_bytes({"optimizer": {}, "scheduler": {}, "global_step": 8})
    (tmp_path / TRAINING_FILE).write_bytes(training[:100])
    with pytest.raises(
        SteelsegError, match=f"^{tmp_path / TRAINING_FILE}: cannot read the checkpoint"
    ):
        read_state(tmp_path)
    (tmp_path / TRAINING_FILE).write_bytes(torch_bytes({"optimizer": {}}))
    with pytest.raises(SteelsegError) as info:
        read_state(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / TRAINING_FILE}: not a steelseg checkpoint (no scheduler, global_step)"
    )
    (tmp_path / TRAINING_FILE).write_bytes(training)
    assert read_state(tmp_path)["global_step"] == 8


def test_a_sweeps_best_checkpoint_file_that_is_not_text_is_one_line(tmp_path):
    (tmp_path / "best_checkpoint.txt").write_bytes(b"\xff\xfe/runs/x")
    with pytest.raises(SteelsegError) as info:
        resolve_checkpoint(tmp_path)
    assert str(info.value).startswith(
        f"{tmp_path / 'best_checkpoint.txt'}: not the path of a checkpoint (UnicodeDecodeError"
    )


def test_broken_rules_next_to_a_checkpoint_are_one_line(tmp_path):
    (tmp_path / "postprocess.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(SteelsegError) as info:
        load_rules(tmp_path)
    assert str(info.value).startswith(
        f"{tmp_path / 'postprocess.json'}: cannot read (UnicodeDecodeError"
    )


def test_a_checkpoint_with_non_finite_weights_is_refused_for_prediction(tmp_path, capsys):
    from steelseg.cli import main
    from steelseg.config import TrainConfig
    from steelseg.runs import load_checkpoint, write_state
    from steelseg.training.recipe import build_model

    config = TrainConfig()
    state = build_model(config).state_dict()
    state["conv_last.weight"][0, 0] = float("nan")
    folder = tmp_path / "epoch_0002"
    write_state(folder, {"model": state, "config": config.to_dict(), "epoch": 2,
                              "metrics": {}})  # fmt: skip
    with pytest.raises(
        SteelsegError, match="1 weight tensor.s. are NaN or infinite, e.g. conv_last"
    ):
        load_checkpoint(folder)
    assert main(["predict", "--checkpoint", str(folder), "--images", str(tmp_path)]) == 1
    assert "NaN or infinite" in capsys.readouterr().err
    state["conv_last.weight"][0, 0] = 0.0  # the same checkpoint with finite weights loads
    write_state(folder, {"model": state, "config": config.to_dict(), "epoch": 2, "metrics": {}})
    assert torch.isfinite(load_checkpoint(folder)[0].conv_last.weight).all()
