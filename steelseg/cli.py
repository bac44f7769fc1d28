"""The ``steelseg`` command: ``synth``, ``validate``, ``calibrate``, ``evaluate``, ``figures``.

Errors a user can fix are printed as one line on stderr, with exit status 1.
"""

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from steelseg.data import catalog, rle, synth
from steelseg.errors import SteelsegError
from steelseg.paths import local_path

DATA_MD_MASK_SHARE = {1: 0.13, 2: 0.03, 3: 0.73, 4: 0.11}
DATA_MD_AREA = {1: 0.011, 2: 0.008, 3: 0.062, 4: 0.084}


def cmd_synth(args: argparse.Namespace) -> int:
    out = synth.write_dataset(
        args.out,
        args.images,
        height=args.height,
        width=args.width,
        seed=args.seed,
        modalities=args.modalities.split(","),
        processes=args.processes,
    )
    print(f"wrote {args.images} images and train.csv to {out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    modalities = args.modalities.split(",")
    size = _parse_size(args.size) if args.size else None
    table, problems = catalog.scan(args.data_dir, modalities=modalities, expected_size=size)
    print(format_summary(catalog.summary(table, problems)))
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s) in {args.data_dir}")
    return 1 if problems else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from steelseg.inference import postprocess, predict

    _, report = predict.calibrate(
        args.checkpoint, batch_size=args.batch_size, tta=args.tta, use_gpu=args.use_gpu
    )
    folder = Path(report["checkpoint"])
    rules = postprocess.load(folder)
    print(f"calibrated on {report['images']} validation images of {folder.parent.name}")
    print("class  threshold  min_area  min_component  gate   Dice before  after")
    for c, rule in enumerate(rules.classes):
        print(
            f"{c + 1:>5}  {rule.threshold:9.2f}  {rule.min_area:8d}  {rule.min_component:13d}  "
            f"{rule.gate:4.2f}   {report['dice_per_class_before'][c]:.4f}       "
            f"{report['dice_per_class_after'][c]:.4f}"
        )
    print(
        f"Kaggle Dice {report['kaggle_dice_before']:.4f} -> {report['kaggle_dice_after']:.4f} "
        f"(all-empty baseline {report['empty_baseline']:.4f}); "
        f"saved {folder / postprocess.RULES_FILE}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from steelseg.evaluation import score as evaluate

    scores = evaluate.evaluate(args.truth, args.images, args.submission)
    if args.json:
        print(json.dumps(scores.as_dict(), indent=2))
    else:
        print(evaluate.format_scores(scores))
    return 0


def cmd_figures(args: argparse.Namespace) -> int:
    import pandas as pd

    from steelseg.data import images
    from steelseg.evaluation import figures
    from steelseg.evaluation import score as evaluate

    out = local_path(args.out, "figures folder")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.data:
        # a few images are drawn: headers are checked, not every image decoded
        table = catalog.load(args.data, drop_bad=True, decode_images=False, report=print)
        written.append(figures.samples_figure(table, out / "figure1_samples.png", args.count))
    if args.run_dir:
        written.append(
            figures.loss_curves(local_path(args.run_dir, "run"), out / "figure2_loss.png")
        )
    if args.submission:
        if not args.data:
            raise SteelsegError("figures --submission needs --data (the truth and the images)")
        listed: set[str] = set()
        predicted = evaluate.read_rows(local_path(args.submission, "submission"), listed)
        shown = table[table["image_id"].isin(listed)]
        if shown.empty:
            raise SteelsegError(f"{args.submission}: none of its images is in {args.data}")
        defect = shown[[f"has_{c}" for c in catalog.CLASS_IDS]].any(axis=1)
        defect |= shown["image_id"].isin(predicted)
        shown = pd.concat([shown[defect], shown[~defect]]).head(args.count)  # defects first
        samples = []
        for _, row in shown.iterrows():
            image = images.read_image(row["path"])
            name, (height, width) = row["image_id"], image.shape[:2]
            truth = [row[f"rle_{c}"] or "" for c in catalog.CLASS_IDS]
            true = rle.decode_classes(truth, height, width, image_id=name)
            pred = evaluate.decode(predicted.get(name, {}), height, width, args.submission)
            samples.append((name, image, true, pred))
        written.append(figures.predictions_figure(samples, out / "figure3_predictions.png"))
    if not written:
        raise SteelsegError("figures: nothing to draw; give --data, --run and/or --submission")
    for path in written:
        print(f"wrote {path}")
    return 0


def format_summary(s: dict) -> str:
    n = s["images"]
    by_count = "/".join(str(s["images_by_class_count"][k]) for k in (1, 2, 3))
    lines = [
        f"{n} images, {s['defect_free']} defect-free ({s['defect_free'] / max(n, 1):.1%}; "
        f"real data 47%), with 1/2/3 classes: {by_count}",
        "class  masks  share (real)   mean area (real)",
    ]
    total = max(sum(s["masks"].values()), 1)
    for c in catalog.CLASS_IDS:
        share = s["masks"][c] / total
        area = s["mean_area_fraction"][c]
        lines.append(
            f"{c:>5}  {s['masks'][c]:>5}  {share:>5.1%} ({DATA_MD_MASK_SHARE[c]:.0%})"
            f"   {area:>6.2%} ({DATA_MD_AREA[c]:.1%})"
        )
    return "\n".join(lines)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SteelsegError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 256x1600") from None
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steelseg", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("synth", help="write a synthetic data set in the Severstal layout")
    p.add_argument("out", help="folder to create (must not hold a train.csv)")
    p.add_argument("--images", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--height", type=int, default=256, help="image height (default 256)")
    p.add_argument("--width", type=int, default=1600, help="image width (default 1600)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--modalities", default="visible", help="comma list, e.g. visible,ir (default visible)"
    )
    p.add_argument("--processes", type=int, default=None, help="worker processes (default: cores)")
    p.set_defaults(run=cmd_synth)

    p = commands.add_parser("validate", help="check every CSV row and image of a data folder")
    p.add_argument("data_dir", help="folder with train.csv and train_images/")
    p.add_argument("--size", help="required HEIGHTxWIDTH (default: the most common size)")
    p.add_argument(
        "--modalities", default="visible", help="image folders to check, e.g. visible,ir"
    )
    p.set_defaults(run=cmd_validate)

    p = commands.add_parser(
        "calibrate", help="search per-class post-processing on a run's validation split"
    )
    p.add_argument("checkpoint", help="checkpoint folder, training run or Tune sweep")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--tta", action="store_true", help="average over flips, as predict --tta")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="run on CUDA (default: when there is one)")  # fmt: skip
    p.set_defaults(run=cmd_calibrate)

    p = commands.add_parser("evaluate", help="score a submission CSV against the truth")
    p.add_argument("--truth", required=True, help="train.csv (either format) with the true masks")
    p.add_argument("--images", required=True, help="folder of the images scored (their sizes)")
    p.add_argument("--submission", required=True, help="ImageId,EncodedPixels,ClassId CSV")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.set_defaults(run=cmd_evaluate)

    p = commands.add_parser("figures", help="the paper's figures as PNG files")
    p.add_argument("out", help="folder for figure1_samples.png, figure2_loss.png, ...")
    p.add_argument("--data", help="data folder: Figure 1 samples (and the truth for Figure 3)")
    p.add_argument(
        "--run", dest="run_dir", help="training run folder: Figure 2 loss curves (TensorBoard)"
    )
    p.add_argument("--submission", help="predictions CSV: Figure 3 against --data's truth")
    p.add_argument("--count", type=int, default=3, help="images per figure part (default 3)")
    p.set_defaults(run=cmd_figures)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.run, args)


class _Formatter(logging.Formatter):
    """Our messages as plain lines; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"steelseg: {record.levelname.lower()}: {message}"
        return message


def setup_logging(verbose: bool = False) -> None:
    """steelseg's messages on stderr, info and above (debug with ``verbose``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("steelseg")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def run_command(
    run: Callable[[argparse.Namespace], int], args: argparse.Namespace, verbose: bool = False
) -> int:
    setup_logging(verbose)
    try:
        return run(args)
    except catalog.DataProblems as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        print(
            f"steelseg: error: {len(e.problems)} data problem(s); fix them or drop the images "
            "they concern with --drop-bad",
            file=sys.stderr,
        )
        return 1
    except SteelsegError as e:
        print(f"steelseg: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
