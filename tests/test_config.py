import json
import subprocess
import sys
from pathlib import Path

import pytest

from steelseg.config import TrainConfig, add_arguments, from_args, read_config_file
from steelseg.errors import SteelsegError

TRAIN_JOB = Path(__file__).parent.parent / "ray_jobs" / "train.py"


def parse(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(list(argv)))


def test_flags_override_file_and_defaults(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 0.002\nepochs: 7\nmodalities: [visible, ir]\n")
    config = parse("--config", str(tmp_path / "run.yaml"), "--epochs", "3", "--no-amp")
    assert config.lr == 0.002 and config.epochs == 3 and config.amp is False
    assert config.modalities == ["visible", "ir"]
    assert config.batch_size == TrainConfig().batch_size


def test_json_file_and_list_flags(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"use_gpu": True, "bce_weight": 1}))
    config = parse("--config", str(tmp_path / "run.json"), "--pos-weight", "2,1,1,3")
    assert config.use_gpu is True and config.bce_weight == 1.0
    assert config.pos_weight == [2.0, 1.0, 1.0, 3.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lrr: 1\n", "run.yaml: unknown config key(s) lrr"),
        ("lr: fast\n", "run.yaml: config lr must be float, got 'fast'"),
        ("- 1\n", "run.yaml: expected a mapping of config keys, got list"),
        ("lr: [\n", "run.yaml: not valid yaml"),
        ("crop_height: 100\n", "crop_height must be a multiple of 32, got 100"),
        ("placement_strategy: WIDE\n", "placement_strategy must be PACK"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(SteelsegError) as info:
        TrainConfig.from_dict(read_config_file(tmp_path / "run.yaml"), str(tmp_path / "run.yaml"))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_config_round_trips_through_a_dict():
    config = TrainConfig(lr=0.01, modalities=["visible", "ir"], pos_weight=[1.0, 2.0, 3.0, 4.0])
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.replace(epochs=2).epochs == 2


def run_job(*args):
    return subprocess.run(
        [sys.executable, str(TRAIN_JOB), *args], capture_output=True, text=True, timeout=120
    )


def test_train_job_help_shows_every_flag_with_defaults():
    out = run_job("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for flag in (
        "--data",
        "--storage",
        "--name",
        "--epochs",
        "--num-workers",
        "--batch-size",
        "--lr",
        "--bce-weight",
        "--dice-weight",
        "--use-gpu",
        "--no-use-gpu",
        "--config",
    ):
        assert flag in text
    assert f"(default: {TrainConfig().lr})" in text


def test_train_job_unknown_config_key_is_one_line_and_exit_1(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 2\nlearning_rate: 0.1\n")
    out = run_job("--config", str(tmp_path / "run.yaml"))
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0
    assert "unknown config key(s) learning_rate" in out.stderr and "Traceback" not in out.stderr


def test_train_job_bad_data_path_is_one_line_and_exit_1(tmp_path):
    out = run_job("--data", str(tmp_path / "missing"), "--storage", str(tmp_path))
    assert out.returncode == 1
    assert out.stderr.strip() == f"steelseg: error: {tmp_path / 'missing'}: no such data folder"


def test_train_job_refuses_bad_data_with_the_validate_lines(data_copy, tmp_path):
    with open(data_copy / "train.csv", "a") as f:
        f.write("ghost.jpg,3,1 2\n")
    out = run_job("--data", str(data_copy), "--storage", str(tmp_path))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("train.csv row") and "ghost.jpg is not in train_images/" in lines[0]
    assert lines[-1].startswith("steelseg: error: 1 data problem(s)") and "--drop-bad" in lines[-1]


def test_resolved_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(data="d", pretrained="w.pth", storage="runs").resolved()
    assert config.data == str(tmp_path / "d") and config.pretrained == str(tmp_path / "w.pth")
    assert config.storage == str(tmp_path / "runs")
    assert TrainConfig(pretrained="imagenet").resolved().pretrained == "imagenet"
    assert TrainConfig().resolved().data == ""
