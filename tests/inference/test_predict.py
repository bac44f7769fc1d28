"""After training: calibrate -> predict (Ray Data actors) -> evaluate -> figures, on the shared
run of conftest.py (four classes, 48x176 images, the run in the S3-compatible test store) and
on real 256x1600 images."""

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ODD_H, ODD_W
from PIL import Image

from steelseg import runs
from steelseg.cli import main as steelseg
from steelseg.data import rle
from steelseg.errors import SteelsegError
from steelseg.inference import postprocess
from steelseg.model import inputs
from steelseg.storage import locate

VAL_IMAGES = 24


@pytest.fixture(scope="module")
def run_dir(trained_run, request) -> Path:
    """The shared run. The predict jobs that run as processes of their own start here, as soon
    as the run is there (``predict_jobs``)."""
    request.getfixturevalue("predict_jobs")
    return trained_run.run_dir


@pytest.fixture(scope="module")
def val_images(trained_run, tmp_path_factory) -> Path:
    """The run's validation images alone in a local folder."""
    split = runs.read_split(trained_run.run_dir)
    folder = tmp_path_factory.mktemp("val") / "images"
    folder.mkdir()
    for path in split.loc[split["split"] == "val", "path"]:  # in the bucket
        image = locate(path, "image")
        (folder / image.name).write_bytes(image.read_bytes())
    return folder


@pytest.fixture(scope="module")
def val_images_uri(val_images, s3) -> str:
    """The same images in the bucket."""
    return s3.upload(val_images, "val/images")


def submission_path(tmp_path: Path) -> Path:
    return tmp_path / "out" / "submission.csv"


PLAIN = "steelseg-test-plain-predict"


@dataclasses.dataclass
class PredictJobs:
    plain: str  # the URI of the submission the plain job writes
    strict: subprocess.Popen  # the strict job
    strict_out: Path  # where the strict job would write its submission


@pytest.fixture(scope="module")
def predict_jobs(cluster, trained_run, val_images, val_images_uri, s3, tmp_path_factory):
    """This module's two predict jobs that run as processes of their own, both started at once
    and waited for by the tests that check them, so that they run beside the tests that predict
    in this process:

    - plain: the predict job submitted with `ray job submit` on the run's validation images,
      uncalibrated, 2 actors, images and submission in the bucket;
    - strict: the predict job as a user runs it on a machine with a `ray start` cluster
      (without RAY_ADDRESS it finds the cluster that ray start recorded, and attaches to it),
      with flip TTA and ``--strict``, on 3 validation images and an unreadable one."""
    out = s3.uri("submissions/plain.csv")
    argv = ["python", "-m", "ray_jobs.predict", "--images", val_images_uri, "--out", out,
            "--no-progress", "--uncalibrated", "--checkpoint", trained_run.run_dir.target,
            "--actors", "2", "--batch-size", "3"]  # fmt: skip
    job = cluster.job("submit", "--working-dir", ".", "--no-wait", "--submission-id", PLAIN,
                      "--", *argv)  # fmt: skip
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]

    folder = tmp_path_factory.mktemp("strict") / "images"
    folder.mkdir()
    for image in sorted(val_images.iterdir())[:3]:
        shutil.copy(image, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    strict_out = folder.parent / "strict.csv"
    strict = subprocess.Popen(
        [sys.executable, "ray_jobs/predict.py", "--checkpoint", trained_run.run_dir.target,
         "--images", str(folder), "--out", str(strict_out), "--strict", "--tta",
         "--no-progress"],
        cwd=Path(__file__).parents[2], env=cluster.env,  # RAY_TMPDIR: the cluster's
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        yield PredictJobs(out, strict, strict_out)
    finally:
        strict.kill()  # if a test did not wait for it; its actors end with the cluster
        strict.communicate()


@pytest.fixture(scope="module")
def plain_submission(cluster, predict_jobs) -> str:
    """The plain predict job, finished; returns its submission's URI."""
    status = cluster.wait_for_job(PLAIN)
    logs = cluster.job("logs", PLAIN).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    assert "wrote s3://steelseg/submissions/plain.csv: 24 images" in logs
    assert "execution finished" not in logs  # none of Ray Data's INFO lines
    return predict_jobs.plain


def predict_to(out: Path, *args, **kwargs) -> pd.DataFrame:
    """``predict``, with the table written to ``out`` as the predict command does."""
    from steelseg.inference.predict import predict, write_submission

    submission = predict(*args, **kwargs)
    write_submission(submission, out)
    return submission


def test_calibrate_stores_rules_and_predict_applies_them(
    run_dir, val_images, four_class_dir, tmp_path, capsys, steelseg_log
):
    from steelseg.evaluation.score import score_submission

    checkpoint = runs.resolve_checkpoint(run_dir)
    assert steelseg(["calibrate", run_dir.target, "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "Kaggle Dice" in out and "all-empty baseline" in out
    rules = runs.load_rules(checkpoint)
    report = runs.read_calibration(checkpoint)
    assert rules is not None and rules.image_size == (ODD_H, ODD_W)
    assert report["images"] == VAL_IMAGES

    calibrated = predict_to(submission_path(tmp_path), checkpoint, val_images, progress=False)
    assert "calibrated rules" in "\n".join(steelseg_log) and len(calibrated) == 4 * VAL_IMAGES
    scores = score_submission(four_class_dir / "train.csv", val_images, submission_path(tmp_path))
    # evaluate on the validation images reproduces what calibrate measured on them
    assert scores.kaggle_dice == pytest.approx(report["kaggle_dice_after"], abs=0.01)

    # stored rules steer prediction: a minimum area above the image's drops the class
    unsteered = predict_to(
        tmp_path / "plain.csv", checkpoint, val_images, calibrated=False, progress=False
    )
    found = unsteered[unsteered["EncodedPixels"] != ""]["ClassId"].unique().tolist()
    assert found, "the run finds nothing on its validation images"
    dropped = found[0]
    plain = postprocess.Rules.plain(0.5).classes
    planted = [
        dataclasses.replace(rule, min_area=ODD_H * ODD_W + 1) if c + 1 == dropped else rule
        for c, rule in enumerate(plain)
    ]
    runs.save_rules(checkpoint, postprocess.Rules(tuple(planted), (ODD_H, ODD_W)))
    steered = predict_to(tmp_path / "steered.csv", checkpoint, val_images, progress=False)
    dropped_rows = steered["ClassId"] == dropped
    assert (steered.loc[dropped_rows, "EncodedPixels"] == "").all()
    pd.testing.assert_frame_equal(steered[~dropped_rows], unsteered[~dropped_rows])


def bar_image(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A full-size grey image with a bright class-3 bar like the training set's."""
    rng = np.random.default_rng(5)
    image = rng.normal(110, 8, (height, width)).clip(0, 255)
    mask = np.zeros((height, width), np.uint8)
    mask[180:196, 1200:1248] = 1
    image[mask == 1] = 200
    return np.repeat(image.astype(np.uint8)[..., None], 3, axis=2), mask


def test_real_size_images_are_predicted_at_full_size(run_dir, real_dir, tmp_path, steelseg_log):
    """Through the Ray Data stages (read, the model's actors, encode) the masks are those of
    the model's full-size forward of each image: at a threshold that the bar image's class-3
    probabilities cross on about 2,000 pixels, whatever the small run learned, each mask
    matches the forward's except at pixels within float noise of the threshold (a mask
    predicted at another size, or shifted, or of another class, would not)."""
    from steelseg.inference.predict import prepare, probabilities

    folder = tmp_path / "images"
    shutil.copytree(real_dir / "train_images", folder)
    rgb, _ = bar_image(256, 1600)
    Image.fromarray(rgb).save(folder / "bar.jpg", quality=95)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    model, config, _ = runs.load_checkpoint(runs.resolve_checkpoint(run_dir))
    cpu = torch.device("cpu")
    image = np.asarray(Image.open(folder / "bar.jpg").convert("RGB"))[None]
    probs = probabilities(prepare(model, cpu, config.amp), image, cpu, amp=config.amp)[0]
    threshold = float(np.quantile(probs[2], 1 - 2000 / probs[2].size))
    out = submission_path(tmp_path)
    submission = predict_to(
        out, run_dir, folder, progress=False, calibrated=False, actors=2, batch_size=3,
        threshold=threshold,
    )  # fmt: skip
    warnings = [line for line in steelseg_log if line.startswith("warning:")]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0]
    assert len(submission) == 4 * 5
    assert (submission.loc[submission["ImageId"] == "broken.jpg", "EncodedPixels"] == "").all()
    for encoded in submission["EncodedPixels"]:
        rle.decode(encoded, 256, 1600)  # every mask is valid at the real size
    rows = submission[submission["ImageId"] == "bar.jpg"].set_index("ClassId")["EncodedPixels"]
    for c in range(4):
        found = rle.decode(rows[c + 1], 256, 1600).astype(bool)
        expected = probs[c] > threshold
        differ = found != expected
        near = np.abs(probs[c] - threshold) < 0.02 * max(threshold, 1e-3)
        assert (differ & ~near).sum() == 0, c + 1
        assert differ.sum() <= 0.02 * max(expected.sum(), 1), c + 1
    assert rle.decode(rows[3], 256, 1600).sum() > 1500  # about 2,000 of class 3 found


def test_predict_and_evaluate_agree_with_the_runs_validation_score(
    run_dir, val_images_uri, four_class_uri, plain_submission, s3, capsys
):
    submission = pd.read_csv(io.BytesIO(s3.read("submissions/plain.csv")), keep_default_na=False)
    assert list(submission.columns) == ["ImageId", "EncodedPixels", "ClassId"]
    assert len(submission) == 4 * VAL_IMAGES
    by_image = submission.groupby("ImageId")["ClassId"].apply(list)
    assert (by_image == [[1, 2, 3, 4]] * VAL_IMAGES).all()

    capsys.readouterr()
    truth = (locate(four_class_uri, "data") / "train.csv").target  # all three in the bucket
    code = steelseg(["evaluate", "--truth", truth, "--images", val_images_uri,
                     "--submission", plain_submission, "--json"])  # fmt: skip
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    history = runs.read_history(run_dir).set_index("epoch")
    best_epoch = int(runs.best_checkpoint(run_dir).name.split("_")[1])
    expected = history.loc[best_epoch]
    # the same model, images (padded alike) and threshold as the run's validation at that epoch
    assert scores["kaggle_dice"] == pytest.approx(expected["val_kaggle_dice"], abs=0.01)
    assert scores["empty_baseline"] == pytest.approx(expected["val_empty_baseline"])
    assert scores["kaggle_dice"] > scores["empty_baseline"]


def test_strict_prediction_with_tta_writes_nothing_for_an_unreadable_image(cluster, predict_jobs):
    _, stderr = predict_jobs.strict.communicate(timeout=600)
    assert predict_jobs.strict.returncode == 1
    err = stderr.strip().splitlines()
    attached = f"attached to the running Ray cluster at {cluster.address} (started with ray start)"
    assert attached in err, err
    assert err[-1].startswith("steelseg: error: 1 unreadable image") and "broken.jpg" in err[-1]
    assert not [line for line in err if "core_worker" in line]  # Ray's note on actor pools
    assert not predict_jobs.strict_out.exists()


@pytest.mark.parametrize(("height", "width"), [(64, 96), (50, 70)])
def test_tta_is_the_mean_of_the_flipped_predictions_flipped_back(height, width):
    from steelseg.inference.predict import probabilities
    from steelseg.model.unet import UNet

    torch.manual_seed(0)
    model = UNet().eval()
    cpu = torch.device("cpu")
    image = np.random.default_rng(0).integers(0, 255, (1, height, width, 3), dtype=np.uint8)
    plain = probabilities(model, image, cpu)
    assert plain.shape == (1, 4, height, width) and plain.dtype == np.float32
    tta = probabilities(model, image, cpu, tta=True)
    h = probabilities(model, image[:, :, ::-1].copy(), cpu)[..., ::-1]
    v = probabilities(model, image[:, ::-1].copy(), cpu)[:, :, ::-1]
    np.testing.assert_allclose(tta, (plain + h + v) / 3, atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-3  # the views differ, so a no-op TTA would fail


def test_prediction_takes_the_cpus_layout_and_gives_the_same_probabilities(monkeypatch):
    from steelseg.inference.predict import prepare, probabilities
    from steelseg.model.unet import UNet

    image = np.random.default_rng(0).integers(0, 255, (2, 40, 70, 3), dtype=np.uint8)
    cpu, found = torch.device("cpu"), {}
    for capability in ("AVX2", "AVX512"):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        torch.manual_seed(0)
        model = prepare(UNet(), cpu)
        weight = model.encoder.conv1.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) == (capability == "AVX512")
        found[capability] = probabilities(model, image, cpu, amp=False)  # the layout alone
    np.testing.assert_allclose(found["AVX512"], found["AVX2"], atol=1e-5)


def trained_tiny_model(image: np.ndarray, bits: np.ndarray) -> torch.nn.Module:
    """The paper network after 20 AdamW steps on one batch (bf16 where the CPU runs it: 4 s on
    2 shared cores); it then marks the dark defects and the clean steel 99% right."""
    from steelseg.config import TrainConfig
    from steelseg.training import epoch, recipe

    torch.manual_seed(0)
    config = TrainConfig()
    model = recipe.build_model(config).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = {"image": torch.from_numpy(image), "mask": torch.from_numpy(bits)}
    loss_fn, cpu = recipe.build_loss(config), torch.device("cpu")
    epoch.train_one_epoch(model, [batch] * 20, loss_fn, optimizer, scheduler, cpu, amp=True)
    return model


@pytest.mark.skipif(
    not inputs.cpu_runs_bf16(),
    reason="this CPU has no avx512_bf16 or AMX: prediction stays float32",
)
def test_bf16_prediction_marks_what_float32_does_but_at_the_threshold():
    """Measured on an AMD EPYC with avx512_bf16 (torch 2.14): probabilities at most 0.015 apart,
    no pixel's mask different (9 pixels lie within 0.02 of the threshold)."""
    from steelseg.inference.predict import prepare, probabilities

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (2, 32, 64, 3), dtype=np.uint8)
    bits = np.zeros((2, 32, 64), np.uint8)
    bits[0, 8:20, 10:40], bits[1, 4:28, 30:60] = 0b0001, 0b0100
    image[bits > 0] //= 3  # defects are darker
    cpu = torch.device("cpu")
    model = prepare(trained_tiny_model(image, bits), cpu)
    p32 = probabilities(model, image, cpu, amp=False)
    p16 = probabilities(model, image, cpu, amp=True)
    assert 0 < np.abs(p16 - p32).max() < 0.05  # bf16 ran, and stayed close
    masks32, masks16 = p32 > 0.5, p16 > 0.5
    truth = np.stack([(bits >> c) & 1 for c in range(4)], axis=1).astype(bool)
    assert (masks32 == truth).mean() > 0.95 and masks32.any()  # trained: masks to compare
    differ = masks16 != masks32
    assert np.all(np.abs(p32[differ] - 0.5) < 0.05), "masks differ away from the threshold"
    assert differ.mean() < 1e-3


@pytest.mark.parametrize("amp", [True, False])
def test_prediction_follows_the_checkpoints_amp(monkeypatch, tmp_path, amp):
    """A run trained with --no-amp is predicted in float32 and one with amp in bf16, here on a
    CPU that reports bf16 instructions (torch runs CPU autocast on any CPU, if slower)."""
    from steelseg.config import TrainConfig
    from steelseg.inference.predict import Predictor, predict_in_process
    from steelseg.training import recipe

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    config = TrainConfig(amp=amp)
    torch.manual_seed(0)
    checkpoint = tmp_path / "checkpoint"
    state = recipe.build_model(config).state_dict()
    runs.write_state(
        checkpoint, {"model": state, "config": config.to_dict(), "epoch": 0, "metrics": {}}
    )
    path = tmp_path / "a.jpg"
    Image.fromarray(np.full((32, 64, 3), 128, np.uint8)).save(path)
    predictor = Predictor(str(checkpoint), tta=False, rules=None, use_gpu=False)
    dtypes = []
    predictor.model.encoder.conv1.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    batch = {"image_id": np.array(["a.jpg"]), "path": np.array([str(path)])}
    out = predict_in_process(predictor, batch, ["visible"])
    assert out["error"].tolist() == [""]
    assert dtypes == [torch.bfloat16 if amp else torch.float32]


def test_checkpoint_paths_a_run_a_sweep_and_errors(run_dir, tmp_path):
    from steelseg.runs import best_checkpoint, resolve_checkpoint

    best = best_checkpoint(run_dir)
    assert resolve_checkpoint(best) == best
    assert resolve_checkpoint(run_dir) == best
    (tmp_path / "best_checkpoint.txt").write_text(f"{best.target}\n")  # as a sweep writes it
    assert resolve_checkpoint(tmp_path) == best
    with pytest.raises(SteelsegError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(SteelsegError, match="not a checkpoint"):
        resolve_checkpoint(run_dir / "tensorboard")


def overlaid_classes(picture: np.ndarray) -> set[int]:
    """The classes whose colour is blended into the grey steel of a figure's panels: coloured
    pixels (the images are grey) whose colour, less the grey, points the class colour's way;
    the legend's patches (the colours unblended) are left out."""
    from steelseg.evaluation.figures import CLASS_COLORS

    rgb = picture.astype(np.float32)
    legend = np.zeros(rgb.shape[:2], bool)
    for colour in CLASS_COLORS:
        legend |= np.abs(rgb - colour).max(axis=2) <= 6
    rows = np.flatnonzero(legend.any(axis=1))  # the legend's rows, and their edges
    near_legend = np.zeros(rgb.shape[0], bool)
    for row in rows:
        near_legend[max(row - 4, 0) : row + 5] = True
    tinted = (rgb.max(axis=2) - rgb.min(axis=2) > 25) & ~near_legend[:, None]
    shift = rgb[tinted] - rgb[tinted].mean(axis=1, keepdims=True)
    directions = CLASS_COLORS - CLASS_COLORS.mean(axis=1, keepdims=True)
    directions = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    nearest = (shift @ directions.T).argmax(axis=1)
    counts = np.bincount(nearest, minlength=4)
    return {c + 1 for c in range(4) if counts[c] >= 20}


def test_figures_are_written_and_show_the_masks(run_dir, four_class_uri, plain_submission, s3):
    from steelseg.cli.evaluation import submission_samples
    from steelseg.data import catalog

    # data, run, submission and the figures' folder all in the bucket
    code = steelseg(["figures", s3.uri("figures"), "--data", four_class_uri,
                     "--run", run_dir.target, "--submission", plain_submission,
                     "--count", "2"])  # fmt: skip
    assert code == 0
    pictures = {}
    for name in ("figure1_samples.png", "figure2_loss.png", "figure3_predictions.png"):
        picture = Image.open(io.BytesIO(s3.read(f"figures/{name}"))).convert("RGB")
        pictures[name] = np.asarray(picture)
        assert pictures[name].shape[0] > 200 and pictures[name].shape[1] > 400
        assert pictures[name].std() > 10, f"{name} is blank"
    # Figure 3 shows, truth above prediction, the submission's first two images with a defect:
    # the colours of exactly their classes
    table = catalog.load(four_class_uri, decode_images=False)
    shown = submission_samples(table, plain_submission, 2)
    classes = {c + 1 for _, _, true, pred in shown for c in range(4) if (true[c] | pred[c]).any()}
    assert classes and overlaid_classes(pictures["figure3_predictions.png"]) == classes
    assert overlaid_classes(pictures["figure1_samples.png"])  # its defect samples' classes
    assert steelseg(["figures", s3.uri("figures")]) == 1
