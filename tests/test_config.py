import json
import math

import pytest

from steelseg.config import (
    FIELDS,
    TrainConfig,
    add_arguments,
    field_type,
    from_args,
    read_config_file,
)
from steelseg.errors import SteelsegError


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


def test_numbers_yaml_reads_as_strings_are_numbers(tmp_path):
    (tmp_path / "run.yaml").write_text("lr: 1e-3\nweight_decay: 5e-5\npos_weight: [1, 2e0, 1, 1]\n")
    assert read_config_file(tmp_path / "run.yaml")["lr"] == "1e-3"  # YAML 1.1: no dot, a string
    config = parse("--config", str(tmp_path / "run.yaml"))
    assert (config.lr, config.weight_decay) == (0.001, 5e-5)
    assert config.pos_weight == [1.0, 2.0, 1.0, 1.0]
    assert TrainConfig.from_dict({"epochs": "3"}).epochs == 3


@pytest.mark.parametrize("bom", ["", "\ufeff"])  # as Windows editors save UTF-8
def test_json_file_and_list_flags(tmp_path, bom):
    (tmp_path / "run.json").write_text(bom + json.dumps({"use_gpu": True, "bce_weight": 1}))
    config = parse("--config", str(tmp_path / "run.json"), "--pos-weight", "2,1,1,3")
    assert config.use_gpu is True and config.bce_weight == 1.0
    assert config.pos_weight == [2.0, 1.0, 1.0, 3.0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lrr: 1\n", "run.yaml: unknown config key(s) lrr"),
        ("lr: fast\n", "run.yaml: config lr must be float, got 'fast'"),
        ("epochs: 1e3\n", "run.yaml: config epochs must be int, got '1e3'"),
        ("- 1\n", "run.yaml: expected a mapping of config keys, got list"),
        ("lr: [\n", "run.yaml: not valid yaml"),
        ("crop_height: 100\n", "crop_height must be a multiple of 32, got 100"),
        ("placement_strategy: WIDE\n", "placement_strategy must be PACK"),
        ("dice_over: image\n", "config dice_over must be pair or batch, got 'image'"),
        ("pos_weight: [a, b, c, d]\n", "run.yaml: config pos_weight must be float, got 'a'"),
        ("pos_weight: [1, 2]\n", "config pos_weight needs 4 values"),
        ("modalities: visible\n", "run.yaml: config modalities must be a list, got 'visible'"),
        ("modalities: [visible, 3]\n", "run.yaml: config modalities must be str, got 3"),
        ("keep_checkpoints: 0\n", "config keep_checkpoints must be at least 1, got 0"),
        ("max_failures: -1\n", "config max_failures must be >= 0, got -1"),
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


def run_job(capsys, *args):
    """The train job's main in this process: (exit code, stdout, stderr)."""
    from ray_jobs.train import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's --help and usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_job_help_shows_every_flag_with_defaults(capsys):
    code, out, _ = run_job(capsys, "--help")
    assert code == 0
    text = " ".join(out.split())
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
        "--verbose",
    ):
        assert flag in text
    assert f"(default: {TrainConfig().lr})" in text


def test_train_job_unknown_config_key_is_one_line_and_exit_1(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("epochs: 2\nlearning_rate: 0.1\n")
    code, _, err = run_job(capsys, "--config", str(tmp_path / "run.yaml"))
    assert code == 1
    assert err.strip().count("\n") == 0
    assert "unknown config key(s) learning_rate" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.yaml", None, "missing.yaml: no such config file"),
        ("run.json", '{"lr": 0.1,}', "run.json: not valid json"),
        ("run.json", '{"pos_weight": ["a", 1, 1, 1]}', "config pos_weight must be float, got 'a'"),
    ],
)
def test_train_job_bad_config_file_is_one_line_and_exit_1(tmp_path, capsys, name, text, message):
    if text is not None:
        (tmp_path / name).write_text(text)
    code, _, err = run_job(capsys, "--config", str(tmp_path / name))
    assert code == 1 and err.strip().count("\n") == 0
    assert err.startswith("steelseg: error: ") and message in err


def test_train_job_bad_data_path_is_one_line_and_exit_1(tmp_path, capsys):
    code, _, err = run_job(capsys, "--data", str(tmp_path / "missing"), "--storage", str(tmp_path))
    assert code == 1
    assert err.strip() == f"steelseg: error: {tmp_path / 'missing'}: no such data folder"


def test_train_job_refuses_bad_data_with_the_validate_lines(data_copy, tmp_path, capsys):
    with open(data_copy / "train.csv", "a") as f:
        f.write("ghost.jpg,3,1 2\n")
    code, _, err = run_job(capsys, "--data", str(data_copy), "--storage", str(tmp_path))
    assert code == 1
    lines = err.strip().splitlines()
    assert lines[0].startswith("train.csv row") and "ghost.jpg is not in train_images/" in lines[0]
    assert lines[-1].startswith("steelseg: error: 1 data problem(s)") and "--drop-bad" in lines[-1]


def test_resolved_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = TrainConfig(data="d", pretrained="w.pth", storage="runs").resolved()
    assert config.data == str(tmp_path / "d") and config.pretrained == str(tmp_path / "w.pth")
    assert config.storage == str(tmp_path / "runs")
    assert TrainConfig(pretrained="imagenet").resolved().pretrained == "imagenet"
    assert TrainConfig().resolved().data == ""


@pytest.mark.parametrize("key", ["data", "pretrained", "storage"])
def test_uris_with_credentials_or_other_schemes_are_refused_in_one_line(key):
    with pytest.raises(SteelsegError) as info:
        TrainConfig(**{key: "s3://bucket/d?endpoint_override=http://x&secret_key=SECRET"})
    message = str(info.value)
    assert message.startswith(f"config {key} s3://bucket/d: credentials in a URI (secret_key)")
    assert "SECRET" not in message and "\n" not in message
    with pytest.raises(SteelsegError, match=f"^config {key} hdfs://nn/d: hdfs:// is not"):
        TrainConfig(**{key: "hdfs://nn/d"})


def test_data_and_pretrained_uris_keep_their_endpoint_when_resolved(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    config = TrainConfig(data="s3://bucket/severstal", pretrained="gs://w/resnet18.pth")
    resolved = config.resolved()
    assert resolved.data == "s3://bucket/severstal?endpoint_override=http%3A%2F%2F127.0.0.1%3A9000"
    assert resolved.pretrained == "gs://w/resnet18.pth"  # the S3 endpoint is not GCS's


def test_storage_may_be_a_bucket_but_never_with_credentials_in_the_uri():
    config = TrainConfig(storage="s3://bucket/runs?endpoint_override=http://127.0.0.1:9000")
    assert config.run_dir.uri == "s3://bucket/runs/demo"
    assert config.run_dir.query == "endpoint_override=http%3A%2F%2F127.0.0.1%3A9000"
    with pytest.raises(SteelsegError) as info:
        TrainConfig(storage="s3://AKIAXYZ:hunter2@bucket/runs")
    message = str(info.value)
    assert message.startswith("config storage s3://bucket/runs: credentials in a URI")
    assert "hunter2" not in message and "AKIAXYZ" not in message and "\n" not in message


def test_a_worker_range_is_elastic_training():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_args(parser.parse_args(["--num-workers", "1..4"]))
    assert (config.min_workers, config.num_workers, config.workers) == (1, 4, (1, 4))
    assert TrainConfig(num_workers=3).workers == 3
    assert TrainConfig.from_dict({"num_workers": "2..2"}).workers == 2  # not elastic
    for bad in ("4..1", "0..2", "a..b"):
        with pytest.raises(SteelsegError, match=f"config num_workers.*{bad}"):
            TrainConfig.from_dict({"num_workers": bad})
    with pytest.raises(SteelsegError, match="config min_workers must be in 0..num_workers"):
        TrainConfig(num_workers=2, min_workers=3)


FLOAT_FIELDS = [name for name in FIELDS if field_type(name)[0] is float]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", [*FLOAT_FIELDS, "pos_weight"])
def test_every_float_setting_must_be_finite(name, value):
    bad = [1.0, value, 1.0, 1.0] if name == "pos_weight" else value
    with pytest.raises(SteelsegError) as info:
        TrainConfig.from_dict({name: bad})
    assert str(info.value) == f"config {name} must be a finite number, got {bad!r}"


def test_the_float_settings_are_the_ones_expected():
    # a new float setting needs its range checked in validate, as these have
    assert sorted(FLOAT_FIELDS) == sorted(
        ["defect_crops", "rare_share", "val_fraction", "presence_weight", "lr", "weight_decay",
         "bce_weight", "dice_weight", "head_prior", "threshold", "cpus_per_worker"]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"weight_decay": -1e-4}, "config weight_decay must be >= 0, got -0.0001"),
        ({"pos_weight": [1, 0, 2, 3]}, "config pos_weight must be positive, got [1.0, 0.0, 2.0"),
    ],
)
def test_float_settings_out_of_their_range_are_refused(values, message):
    with pytest.raises(SteelsegError) as info:
        TrainConfig.from_dict(values)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lr: .nan\n", "config lr must be a finite number, got nan"),
        ("weight_decay: .inf\n", "config weight_decay must be a finite number, got inf"),
        ("dice_weight: -.inf\n", "config dice_weight must be a finite number, got -inf"),
    ],
)
def test_non_finite_values_in_a_file_are_one_line_errors(tmp_path, text, message):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(SteelsegError) as info:
        TrainConfig.from_dict(read_config_file(tmp_path / "run.yaml"), str(tmp_path / "run.yaml"))
    assert str(info.value) == message


@pytest.mark.parametrize("flag", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_flags_are_refused_before_ray_starts(monkeypatch, capsys, tmp_path, flag):
    from steelseg.training import fit as fitting

    def fit(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(fitting, "fit", fit)
    code, _, err = run_job(capsys, "--storage", str(tmp_path), f"--lr={flag}")
    assert code == 1
    assert err == f"steelseg: error: config lr must be a finite number, got {float(flag)!r}\n"
    assert not (tmp_path / "demo").exists()
