"""Predict defect masks for a folder of images into a Kaggle submission, with Ray Data.

    python ray_jobs/predict.py --checkpoint ~/steelseg_runs/demo --images DIR --out submission.csv
    ray job submit --working-dir . -- python -m ray_jobs.predict --checkpoint /shared/runs/sweep1 \\
        --images /data/severstal/test_images --out /shared/submission.csv --actors 4 --tta

--checkpoint is a checkpoint folder, a training run (its best checkpoint) or a Tune sweep (its
best trial's). Post-processing is the checkpoint's calibrated rules (`steelseg calibrate`) when it
has them, else --threshold. Each image is predicted at its full size, whatever the training crop.
"""

import argparse
import sys

from steelseg.cli import run_command
from steelseg.inference.predict import predict


def run(args: argparse.Namespace) -> int:
    predict(
        args.checkpoint,
        args.images,
        args.out,
        batch_size=args.batch_size,
        actors=args.actors,
        tta=args.tta,
        use_gpu=args.use_gpu,
        calibrated=not args.uncalibrated,
        threshold=args.threshold,
        strict=args.strict,
        progress=not args.no_progress,
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint, run or sweep folder")
    parser.add_argument("--images", required=True, help="folder of .jpg images to predict")
    parser.add_argument("--out", default="submission.csv", help="CSV to write (submission.csv)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--actors", type=int, default=1, help="model replicas (default 1)")
    parser.add_argument("--tta", action="store_true", help="average over horizontal/vertical flips")
    parser.add_argument(
        "--use-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one GPU per actor (default: when the cluster has GPUs)",
    )
    parser.add_argument(
        "--uncalibrated", action="store_true", help="ignore the calibrated rules; use --threshold"
    )
    parser.add_argument(
        "--threshold", type=float, default=0.5, help="without calibration (default 0.5)"
    )
    parser.add_argument(
        "--strict", action="store_true", help="an unreadable image is an error (default: reported)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
