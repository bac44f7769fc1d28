"""Evaluation commands: ``evaluate`` scores a submission, ``figures`` draws the paper's figures."""

import argparse
import json

from steelseg.cli.command import Command
from steelseg.domain import HAS_COLUMNS, RLE_COLUMNS
from steelseg.errors import SteelsegError
from steelseg.paths import local_path


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
    p.add_argument("out", help="folder for figure1_samples.png, figure2_loss.png, ...")
    p.add_argument("--data", help="data folder: Figure 1 samples (and the truth for Figure 3)")
    p.add_argument(
        "--run", dest="run_dir", help="training run folder: Figure 2 loss curves (TensorBoard)"
    )
    p.add_argument("--submission", help="predictions CSV: Figure 3 against --data's truth")
    p.add_argument("--count", type=int, default=3, help="images per figure part (default 3)")


def figures(args: argparse.Namespace) -> int:
    import logging

    from steelseg.data import catalog
    from steelseg.evaluation import figures

    out = local_path(args.out, "figures folder")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.data:
        # a few images are drawn: headers are checked, not every image decoded
        table = catalog.load(
            args.data, drop_bad=True, decode_images=False, report=logging.getLogger(__name__).info
        )
        written.append(figures.samples_figure(table, out / "figure1_samples.png", args.count))
    if args.run_dir:
        run_dir = local_path(args.run_dir, "run")
        written.append(figures.loss_curves(run_dir, out / "figure2_loss.png"))
    if args.submission:
        if not args.data:
            raise SteelsegError("figures --submission needs --data (the truth and the images)")
        samples = submission_samples(table, args.submission, args.count)
        written.append(figures.predictions_figure(samples, out / "figure3_predictions.png"))
    if not written:
        raise SteelsegError("figures: nothing to draw; give --data, --run and/or --submission")
    for path in written:
        print(f"wrote {path}")
    return 0


def submission_samples(table, submission: str, count: int) -> list:
    """Up to ``count`` (name, image, truth, prediction) of the submission's images, those with
    a defect (true or predicted) first."""
    import pandas as pd

    from steelseg.data import images, rle
    from steelseg.evaluation import score

    listed: set[str] = set()
    predicted = score.read_rows(local_path(submission, "submission"), listed)
    shown = table[table["image_id"].isin(listed)]
    if shown.empty:
        raise SteelsegError(f"{submission}: none of its images is in the data folder")
    defect = shown[HAS_COLUMNS].any(axis=1) | shown["image_id"].isin(predicted)
    shown = pd.concat([shown[defect], shown[~defect]]).head(count)
    samples = []
    for _, row in shown.iterrows():
        image = images.read_image(row["path"])
        name, (height, width) = row["image_id"], image.shape[:2]
        truth = [row[col] or "" for col in RLE_COLUMNS]
        true = rle.decode_classes(truth, height, width, image_id=name)
        pred = score.rows_to_masks(predicted.get(name, {}), height, width, submission)
        samples.append((name, image, true, pred))
    return samples


EVALUATE = Command(
    "evaluate", "score a submission CSV against the truth", evaluate_arguments, evaluate
)
FIGURES = Command("figures", "the paper's figures as PNG files", figures_arguments, figures)
