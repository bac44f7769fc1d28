import re
import subprocess
import sys

import pytest

from steelseg.cli import main


def test_synth_then_validate_prints_statistics(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["synth", str(out), "--images", "40", "--height", "32", "--width", "160"]) == 0
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    from steelseg.data import catalog

    s = catalog.summary(catalog.scan(out)[0])
    free, by_count = s["defect_free"], s["images_by_class_count"]
    assert printed[0] == (
        f"40 images, {free} defect-free ({free / 40:.1%}; real data 47%), with 1/2/3 classes: "
        f"{by_count[1]}/{by_count[2]}/{by_count[3]}"
    )
    masks = sum(s["masks"].values())
    for c in (1, 2, 3, 4):  # each class's masks, share and mean area, as the summary counts
        fields = printed[1 + c].split()
        assert fields[:3] == [str(c), str(s["masks"][c]), f"{s['masks'][c] / masks:.1%}"]
        assert fields[4] == f"{s['mean_area_fraction'][c]:.2%}"
    assert sum(by_count.values()) + free == 40 and masks > 0
    assert printed[-1] == f"0 problem(s) in {out}"


def test_broken_csv_row_is_one_line_naming_the_row_and_exit_1(data_copy, capsys):
    with open(data_copy / "train.csv", "a") as f:
        f.write("ghost.jpg,3,1 2 3\n")
    assert main(["validate", str(data_copy)]) == 1
    out = capsys.readouterr().out.splitlines()
    problem_lines = [line for line in out if line.startswith("train.csv row")]
    assert len(problem_lines) == 1
    assert "train.csv row" in problem_lines[0] and "ghost.jpg" in problem_lines[0]
    assert out[-1] == f"1 problem(s) in {data_copy}"


def test_bad_path_is_one_line_error(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such data folder" in err and "Traceback" not in err


def test_bad_size_flag(synth_dir, capsys):
    assert main(["validate", str(synth_dir), "--size", "big"]) == 1
    assert "expected HEIGHTxWIDTH" in capsys.readouterr().err


def test_help_lists_every_command_and_the_ray_jobs_run_the_same_ones(capsys):
    from ray_jobs.predict import main as predict_job

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    commands = ("train", "tune", "predict", "calibrate", "export", "serve", "evaluate", "figures",
                "tensorboard", "synth", "validate")  # fmt: skip
    for name in commands:
        assert re.search(rf"\n    {name}\s", out), name
    with pytest.raises(SystemExit):
        predict_job(["--help"])
    assert capsys.readouterr().out.startswith("usage: steelseg predict")


def test_version_is_the_packages(capsys):
    from importlib.metadata import version

    import steelseg

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"steelseg {steelseg.__version__}\n"
    assert version("steelseg") == steelseg.__version__  # pyproject.toml reads __version__


def test_python_dash_m_steelseg_is_the_steelseg_command():
    import subprocess
    import sys

    import steelseg

    ran = subprocess.run(
        [sys.executable, "-m", "steelseg", "--version"], capture_output=True, text=True, check=False
    )
    assert (ran.returncode, ran.stdout) == (0, f"steelseg {steelseg.__version__}\n")
    ran = subprocess.run(
        [sys.executable, "-m", "steelseg", "validate"], capture_output=True, text=True, check=False
    )
    assert ran.returncode == 2 and "usage: steelseg validate" in ran.stderr


def test_unknown_subcommand_exits_nonzero():
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_validate_lists_every_problem_when_a_bad_rle_is_on_an_existing_image(
    where, data_copy, request, capsys
):
    names = sorted(p.name for p in (data_copy / "train_images").iterdir())
    masked = [line.split(",")[0] for line in (data_copy / "train.csv").read_text().splitlines()[1:]]
    truncated = masked[0]
    whole = (data_copy / "train_images" / truncated).read_bytes()
    (data_copy / "train_images" / truncated).write_bytes(whole[: len(whole) // 2])
    clean = next(n for n in names if n not in masked)
    with open(data_copy / "train.csv", "a") as f:
        f.write(f"{clean},3,10 5 3 7\n")  # runs out of order
        f.write("ghost.jpg,1,1 2\n")
    rows = len((data_copy / "train.csv").read_text().splitlines())
    data, shown = str(data_copy), str(data_copy)
    if where == "bucket":  # listed, sized and decoded from the store, nothing copied here
        s3 = request.getfixturevalue("s3")
        data, shown = s3.upload(data_copy, "validate/data"), "s3://steelseg/validate/data"
    assert main(["validate", data]) == 1
    out = capsys.readouterr().out.splitlines()
    assert f"train_images/{truncated}: unreadable image" in "\n".join(out)
    assert any(
        line.startswith(f"train.csv row {rows - 1}: bad RLE for image {clean} class 3")
        for line in out
    )
    assert any(line.startswith(f"train.csv row {rows}: image ghost.jpg") for line in out)
    assert out[0].startswith("58 images")  # the summary leaves out the two flagged images
    assert out[-1] == f"3 problem(s) in {shown}"


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "http://host/severstal"],
        ["evaluate", "--truth", "hdfs://b/train.csv", "--images", ".", "--submission", "s.csv"],
    ],
)
def test_other_uri_schemes_are_refused_in_one_line(argv, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ":// is not supported; use a local or shared path" in err


def test_building_the_parser_imports_neither_ray_tune_nor_torch():
    """Every command builds the whole parser first: `steelseg --help` and a data command must
    not pay Ray Tune's import (4 s, 700 MB) for the sweep's options."""
    code = (
        "import sys; from steelseg.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('ray.tune', 'torch') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_store_that_does_not_answer_is_one_line_naming_the_uri(capsys):
    from raynodes import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (
        ["calibrate", f"s3://steelseg/runs/demo?endpoint_override={endpoint}"],
        ["figures", "out", "--run", f"s3://steelseg/runs/demo?endpoint_override={endpoint}"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("steelseg: error: "), err
        assert "s3://steelseg/runs/demo" in err and "endpoint_override" not in err
        assert "Could not connect" in err or "NETWORK_CONNECTION" in err


def test_missing_bucket_or_run_and_credentials_in_a_uri_are_one_line_errors(s3, capsys):
    missing = f"s3://no-such-bucket/runs/demo?endpoint_override={s3.endpoint}"
    assert main(["calibrate", missing]) == 1
    assert capsys.readouterr().err == (
        "steelseg: error: s3://no-such-bucket/runs/demo: no such checkpoint, run or sweep\n"
    )
    secret = "s3://steelseg/runs?access_key=AKIA&secret_key=hunter2"
    assert main(["train", "--storage", secret]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "credentials in a URI" in err and "hunter2" not in err
    assert main(["train", "--storage", "ftp://host/runs"]) == 1
    assert "ftp:// is not supported" in capsys.readouterr().err


def test_the_api_pages_imports_work():
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    block = page.split("```python", 1)[1].split("```")[0]
    imports = [line for line in block.splitlines() if line.startswith(("from ", "import "))]
    assert len(imports) >= 2
    namespace: dict = {}
    exec("\n".join(imports), namespace)
    for name in ("TrainConfig", "fit", "predict", "calibrate", "sweep", "score_submission"):
        assert callable(namespace[name]), name


def test_every_steelseg_command_line_of_the_serving_docs_parses():
    import shlex
    from pathlib import Path

    from steelseg.cli import build_parser

    docs = (Path(__file__).parents[1] / "docs" / "serving.md").read_text()
    blocks = [block.split("```", 1)[0] for block in docs.split("```bash\n")[1:]]
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = [line.split("#")[0] for line in lines if line.strip().startswith("steelseg ")]
    assert len(commands) >= 6
    for command in commands:
        args = build_parser().parse_args(shlex.split(command)[1:])  # exits on a bad one
        assert args.command in ("export", "serve"), command


def test_sigterm_is_taken_as_ctrl_c_so_ray_ends_the_run_cleanly():
    import os
    import signal

    from steelseg.cluster import stop_as_interrupt

    interrupted = []  # SIGINT is what Ray Train's and Tune's handlers act on
    previous_int = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    previous = stop_as_interrupt()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handlers run between bytecodes
            if interrupted:
                break
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    assert interrupted == [True]


@pytest.mark.parametrize(("pretrained", "best"), [("", 0.8586), ("imagenet", 0.8586), ("", 0.89)])
def test_a_run_barely_above_predicting_nothing_ends_saying_what_it_takes(
    tmp_path, monkeypatch, capsys, pretrained, best
):
    """`steelseg train` as it ends, on a finished run's history (training itself stubbed)."""
    from steelseg import runs
    from steelseg.storage import locate
    from steelseg.training import fit as fitting

    run_dir = locate(tmp_path / "run", "storage")
    run_dir.mkdir()
    for epoch, score in enumerate([0.8555, best, 0.8524], start=1):
        metrics = {"epoch": epoch, "train_images": 256, "val_kaggle_dice": score,
                   "val_empty_baseline": 0.8555}  # fmt: skip
        runs.append_history(run_dir, metrics)
    finished = fitting.FitResult(run_dir, metrics=metrics)
    monkeypatch.setattr(fitting, "fit", lambda config, **kwargs: finished)
    argv = ["train", "--data", str(tmp_path), "--storage", str(tmp_path)]
    assert main(argv + (["--pretrained", pretrained] if pretrained else [])) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    if best > 0.8555 + 0.01:  # a run that learned: nothing to say
        assert notes == []
        return
    (note,) = notes
    assert note.startswith("note: the best epoch is +0.003 over predicting no defect anywhere")
    assert "than this run's 768 images (docs/training.md, Recipes)" in note
    if pretrained:
        assert "the network needs" in note and "random" not in note
        assert "--pretrained" not in note
    else:
        assert "from random weights the network needs" in note
        assert note.endswith(", or --pretrained imagenet")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["predict", "--checkpoint", "run", "--images", "i", "--threshold", "nan"],
         "argument --threshold: must be in (0, 1), got nan"),
        (["predict", "--checkpoint", "run", "--images", "i", "--threshold", "1"],
         "argument --threshold: must be in (0, 1), got 1"),
        (["tensorboard", "missing", "--every", "nan"],
         "argument --every: must be a positive number of seconds, got nan"),
        (["tensorboard", "missing", "--every", "inf"],
         "argument --every: must be a positive number of seconds, got inf"),
        (["tensorboard", "missing", "--every", "-1"],
         "argument --every: must be a positive number of seconds, got -1"),
    ],
)  # fmt: skip
def test_float_flags_out_of_range_or_not_finite_are_usage_errors(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / a) if a in ("run", "i", "missing") else a for a in argv])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)


@pytest.fixture
def no_prediction(monkeypatch):
    """predict stubbed: a test that reaches it fails (the refusals come before it)."""
    from steelseg.inference import predict

    def refuse(*args, **kwargs):
        raise AssertionError("predicted")

    monkeypatch.setattr(predict, "predict", refuse)


def predict_argv(tmp_path, out) -> list[str]:
    return ["predict", "--checkpoint", str(tmp_path), "--images", str(tmp_path), "--out", str(out)]


def test_predict_refuses_to_replace_a_file_before_predicting(tmp_path, capsys, no_prediction):
    out = tmp_path / "submission.csv"
    out.write_text("mine\n")
    assert main(predict_argv(tmp_path, out)) == 1
    assert capsys.readouterr().err == (
        f"steelseg: error: {out}: already exists (--overwrite replaces it)\n"
    )
    assert out.read_text() == "mine\n"


def test_predict_overwrite_replaces_the_file(tmp_path, capsys, monkeypatch):
    import pandas as pd

    from steelseg.inference import predict

    table = pd.DataFrame({"ImageId": ["a.jpg"] * 4, "EncodedPixels": [""] * 4,
                          "ClassId": [1, 2, 3, 4]})  # fmt: skip
    monkeypatch.setattr(predict, "predict", lambda *args, **kwargs: table)
    out = tmp_path / "submission.csv"
    out.write_text("mine\n")
    assert main([*predict_argv(tmp_path, out), "--overwrite"]) == 0
    assert out.read_text().splitlines() == ["ImageId,EncodedPixels,ClassId"] + [
        f"a.jpg,,{c}" for c in (1, 2, 3, 4)
    ]
    assert capsys.readouterr().out == f"wrote {out}: 1 images, 0 class masks found\n"


@pytest.mark.parametrize("case", ["a folder", "below a file", "a missing folder below a file"])
def test_predict_checks_where_it_writes_before_predicting(tmp_path, capsys, no_prediction, case):
    (tmp_path / "notes.txt").write_text("mine\n")
    out, why = {
        "a folder": (tmp_path, "a folder; give the file to write"),
        "below a file": (
            tmp_path / "notes.txt" / "s.csv",
            f"cannot write there ({tmp_path / 'notes.txt'} is a file)",
        ),
        "a missing folder below a file": (
            tmp_path / "notes.txt" / "new" / "s.csv",
            f"cannot write there ({tmp_path / 'notes.txt'} is a file)",
        ),
    }[case]
    assert main(predict_argv(tmp_path, out)) == 1
    assert capsys.readouterr().err == f"steelseg: error: {out}: {why}\n"


def test_predict_refuses_a_read_only_folder_before_predicting(
    tmp_path, capsys, monkeypatch, no_prediction
):
    import os

    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    if os.access(folder, os.W_OK):  # root may write anywhere: the folder is read-only to others
        access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: str(p) != str(folder) and access(p, mode))
    out = folder / "new" / "s.csv"
    assert main(predict_argv(tmp_path, out)) == 1
    assert capsys.readouterr().err == (
        f"steelseg: error: {out}: cannot write there ({folder} is read-only)\n"
    )


def test_predict_refuses_a_bucket_that_does_not_exist_before_predicting(
    s3, tmp_path, capsys, no_prediction
):
    out = f"s3://no-such-bucket/subs/s.csv?endpoint_override={s3.endpoint}"
    assert main(predict_argv(tmp_path, out)) == 1
    assert capsys.readouterr().err == (
        "steelseg: error: s3://no-such-bucket/subs/s.csv: cannot write there (no bucket "
        "no-such-bucket)\n"
    )
    s3.client.put_object(Bucket=s3.bucket, Key="subs/s.csv", Body=b"mine\n")
    assert main(predict_argv(tmp_path, s3.uri("subs/s.csv"))) == 1
    assert capsys.readouterr().err.endswith(
        "subs/s.csv: already exists (--overwrite replaces it)\n"
    )


def test_figures_refuses_to_replace_a_figure_unless_told(real_dir, tmp_path, capsys):
    out = tmp_path / "figures"
    out.mkdir()
    (out / "figure1_samples.png").write_bytes(b"mine")
    assert main(["figures", str(out), "--data", str(real_dir)]) == 1
    figure = out / "figure1_samples.png"
    assert capsys.readouterr().err == (
        f"steelseg: error: {figure}: already exists (--overwrite replaces it)\n"
    )
    assert (out / "figure1_samples.png").read_bytes() == b"mine"
    assert main(["figures", str(out), "--data", str(real_dir), "--overwrite"]) == 0
    assert (out / "figure1_samples.png").read_bytes().startswith(b"\x89PNG")
    (tmp_path / "notes.txt").write_text("mine\n")
    assert main(["figures", str(tmp_path / "notes.txt"), "--data", str(real_dir)]) == 1
    assert capsys.readouterr().err.endswith(
        f"figure1_samples.png: cannot write there ({tmp_path / 'notes.txt'} is a file)\n"
    )


def test_synth_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    argv = ["synth", str(out), "--images", "2", "--height", "32", "--width", "160"]
    assert main(argv) == 1
    assert capsys.readouterr().err == (
        f"steelseg: error: {out}: not an empty folder; synth writes into a new or empty one\n"
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert main(argv) == 0
    assert (out / "train.csv").is_file()
