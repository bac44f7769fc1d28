"""Evaluation commands: ``evaluate`` scores a submission, ``figures`` draws the paper's figures."""

import argparse
import json
import math
import tempfile
from pathlib import Path

from steelseg.cli.command import Command
from steelseg.domain import HAS_COLUMNS, RLE_COLUMNS
from steelseg.errors import SteelsegError

SAMPLES_FIGURE, LOSS_FIGURE, PREDICTIONS_FIGURE = (
    "figure1_samples.png",
    "figure2_loss.png",
    "figure3_predictions.png",
)


def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--truth", required=True, help="train.csv (either format) with the true masks")
    p.add_argument("--images", required=True, help="folder of the images scored (their sizes)")
    p.add_argument("--submission", required=True, help="ImageId,EncodedPixels,ClassId CSV")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")


def evaluate(args: argparse.Namespace) -> int:
    from steelseg.evaluation import score

    scores = score.score_submission(args.truth, args.images, args.submission)
    if args.json:
        print(json.dumps(scores.as_dict(), indent=2))
    else:
        print(score.format_scores(scores))
    return 0


def figures_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "out", help="folder or s3:// / gs:// URI for figure1_samples.png, figure2_loss.png, ..."
    )
    p.add_argument("--data", help="data folder: Figure 1 samples (and the truth for Figure 3)")
    p.add_argument(
        "--run", dest="run_dir", help="training run folder: Figure 2 loss curves (TensorBoard)"
    )
    p.add_argument("--submission", help="predictions CSV: Figure 3 against --data's truth")
    p.add_argument("--count", type=int, default=3, help="images per figure part (default 3)")
    p.add_argument("--overwrite", action="store_true", help="replace figure files in OUT")


def figures(args: argparse.Namespace) -> int:
    from steelseg.storage import locate

    out = locate(args.out, "figures folder")
    for name in figure_files(args):  # before any is drawn
        (out / name).check_new_file(args.overwrite)
    # drawn in a temporary folder, then copied (uploaded) to ``out``: nothing is left there
    # when a figure cannot be drawn
    with tempfile.TemporaryDirectory(prefix="steelseg-figures-") as folder:
        written = draw_figures(args, Path(folder))
        out.upload(folder)
    for path in written:
        print(f"wrote {out / path.name}")
    return 0


def figure_files(args: argparse.Namespace) -> list[str]:
    """The files ``draw_figures`` writes for these arguments."""
    wanted = {
        SAMPLES_FIGURE: args.data,
        LOSS_FIGURE: args.run_dir,
        PREDICTIONS_FIGURE: args.submission,
    }
    return [name for name, given in wanted.items() if given]


def draw_figures(args: argparse.Namespace, out: Path) -> list[Path]:
    import logging

    from steelseg import runs
    from steelseg.data import catalog
    from steelseg.evaluation import figures
    from steelseg.storage import locate

    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.data:
        # a few images are drawn: headers are checked, not every image decoded
        table = catalog.load(
            args.data, drop_bad=True, decode_images=False, report=logging.getLogger(__name__).info
        )
        written.append(figures.samples_figure(table, out / SAMPLES_FIGURE, args.count))
    if args.run_dir:
        with tempfile.TemporaryDirectory(prefix="steelseg-figures-") as cache:
            logs = runs.fetch_tensorboard(args.run_dir, cache)
            title = locate(args.run_dir, "run").name
            written.append(figures.loss_curves(logs, out / LOSS_FIGURE, title))
    if args.submission:
        if not args.data:
            raise SteelsegError("figures --submission needs --data (the truth and the images)")
        samples = submission_samples(table, args.submission, args.count)
        written.append(figures.predictions_figure(samples, out / PREDICTIONS_FIGURE))
    if not written:
        raise SteelsegError("figures: nothing to draw; give --data, --run and/or --submission")
    return [Path(p) for p in written]


def submission_samples(table, submission: str, count: int) -> list:
    """Up to ``count`` (name, image, truth, prediction) of the submission's images, those with
    a defect (true or predicted) first."""
    import pandas as pd

    from steelseg.data import images, rle
    from steelseg.evaluation import score
    from steelseg.storage import locate

    csv = locate(submission, "submission")
    listed: set[tuple[str, int]] = set()
    predicted = score.read_rows(csv, listed)
    shown = table[table["image_id"].isin({image for image, _ in listed})]
    if shown.empty:
        raise SteelsegError(f"{csv}: none of its images is in the data folder")
    defect = shown[HAS_COLUMNS].any(axis=1) | shown["image_id"].isin(predicted)
    shown = pd.concat([shown[defect], shown[~defect]]).head(count)
    samples = []
    for _, row in shown.iterrows():
        image = images.read_image(row["path"])
        name, (height, width) = row["image_id"], image.shape[:2]
        truth = [row[col] or "" for col in RLE_COLUMNS]
        true = rle.decode_classes(truth, height, width, image_id=name)
        pred = score.rows_to_masks(predicted.get(name, {}), height, width, csv)
        samples.append((name, image, true, pred))
    return samples


def seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def tensorboard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run or sweep: folder or s3://, gs:// URI")
    p.add_argument("--port", type=int, default=6006, help="TensorBoard's port (default 6006)")
    p.add_argument(
        "--every", type=seconds, default=30.0, help="seconds between syncs while it runs (30)"
    )
    p.add_argument("--cache", help="local folder for the copies (default: under ~/.cache)")


def tensorboard(args: argparse.Namespace) -> int:
    """Sync the event files of a run or sweep into a local cache, serve them on 127.0.0.1 and
    keep syncing (only what changed) until TensorBoard ends or Ctrl-C."""
    import hashlib
    import os
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    from steelseg import runs
    from steelseg.storage import locate

    place = locate(args.run, "run")
    default = Path(os.path.expanduser("~/.cache/steelseg/tensorboard"))
    cache = (
        Path(args.cache)
        if args.cache
        else default / hashlib.sha1(place.uri.encode()).hexdigest()[:12]
    )
    copied = runs.sync_tensorboard(place, cache)
    print(f"copied {copied} event file(s) of {place} to {cache}")
    binary = shutil.which("tensorboard") or str(Path(sys.executable).with_name("tensorboard"))
    argv = [binary, "--logdir", str(cache), "--host", "127.0.0.1", "--port", str(args.port)]
    print(f"TensorBoard on http://127.0.0.1:{args.port} (Ctrl-C ends it)", flush=True)
    server = subprocess.Popen(argv)
    try:
        while server.poll() is None:
            time.sleep(args.every)
            runs.sync_tensorboard(place, cache)
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
    return 0


EVALUATE = Command(
    "evaluate", "score a submission CSV against the truth", evaluate_arguments, evaluate
)
FIGURES = Command("figures", "the paper's figures as PNG files", figures_arguments, figures)
TENSORBOARD = Command(
    "tensorboard",
    "TensorBoard for a run or sweep anywhere, its event files synced to this machine",
    tensorboard_arguments,
    tensorboard,
)
