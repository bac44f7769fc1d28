"""Training commands: ``train`` runs (or resumes) a training run on Ray, ``tune`` a sweep."""

import argparse
import sys

from steelseg import config as run_config
from steelseg.cli.command import Command

TRAIN_DESCRIPTION = """\
Train the steel-defect U-Net on Ray: locally, or on a cluster under `ray job submit`.

    steelseg train                                # zero set-up demo on synthetic data
    steelseg train --data /data/severstal --storage /shared/runs --name r1 \\
        --num-workers 8 --use-gpu --crop-height 256 --crop-width 512
    ray job submit --working-dir . -- python ray_jobs/train.py --config run.yaml

Rerunning with the same --storage and --name resumes the run from its latest checkpoint.
"""

TUNE_DESCRIPTION = """\
Search learning rate and loss weights (or any config field) with Ray Tune and ASHA.

    steelseg tune --data /data/severstal --storage /shared/runs --name sweep1 \\
        --num-samples 16 --max-concurrent-trials 2 --num-workers 2 --use-gpu --max-epochs 20
    steelseg tune --search-space space.yaml ...   # e.g. {lr: {loguniform: [1e-4, 1e-2]}}

Every training flag sets the base config of all trials. Rerunning with the same --storage and
--name restores an interrupted sweep without rerunning finished trials.
"""


# a best val Dice this close to predicting no defect anywhere is not yet a model: say so
NEAR_EMPTY = 0.01


def near_empty_note(history, pretrained: str) -> str | None:
    """A line for a run whose best epoch is within NEAR_EMPTY of the all-empty baseline (the
    demo on a CPU is one), saying what it takes; None for a run that learned."""
    if history.empty:
        return None
    best = history.loc[history["val_kaggle_dice"].idxmax()]
    gain = best["val_kaggle_dice"] - best["val_empty_baseline"]
    if gain >= NEAR_EMPTY:
        return None
    images = int(history["train_images"].sum())  # over all epochs
    start = "the network" if pretrained else "from random weights the network"
    return (
        f"note: the best epoch is {gain:+.3f} over predicting no defect anywhere, not yet a model "
        f"that finds defects: {start} needs more training than this run's {images:,} images "
        "(docs/training.md, Recipes)" + ("" if pretrained else ", or --pretrained imagenet")
    )


def train(args: argparse.Namespace) -> int:
    from steelseg import runs
    from steelseg.cli.progress import Display
    from steelseg.training.fit import fit

    config = run_config.from_args(args)
    display = Display(config.epochs)
    result = fit(config, on_progress=display.show, verbose=args.verbose)
    display.finish()
    if result.error:  # one line; the run's checkpoints are kept
        print(f"steelseg: error: {result.error}", file=sys.stderr)
        return 1
    run_dir, metrics = result.run_dir, result.metrics
    if metrics:
        print(
            f"finished epoch {metrics['epoch']}: val Dice {metrics['val_kaggle_dice']:.4f} "
            f"(all-empty baseline {metrics['val_empty_baseline']:.4f})"
        )
        note = near_empty_note(runs.read_history(run_dir), config.pretrained)
        if note:
            print(note)
    best = result.best_checkpoint
    where = run_dir.target
    print(f"run:         {where}")
    print(f"best:        {best.target if best else None} (best val Dice)")
    report = result.calibration
    if report:
        print(
            f"calibrated:  val Dice {report['kaggle_dice_before']:.4f} -> "
            f"{report['kaggle_dice_after']:.4f} on {report['images']} images "
            "(prediction uses these rules)"
        )
    print("next:")
    if not report:
        print(f"  steelseg calibrate {where}")
    print(f"  steelseg predict --checkpoint {where} --images IMAGES --out sub.csv")
    print(f"  steelseg figures figures/ --run {where}")
    print(f"  {tensorboard_command(run_dir)}")
    return 0


def tensorboard_command(place) -> str:
    """How to read a run's or sweep's curves: plain TensorBoard on a local folder, else ours,
    which syncs the event files from the store."""
    if place.local:
        return f"tensorboard --logdir {place.path}"
    return f"steelseg tensorboard {place.target}"


def tune_arguments(p: argparse.ArgumentParser) -> None:
    sweep = p.add_argument_group("sweep")
    sweep.add_argument(
        "--search-space",
        help=f"YAML file: config key -> {{sampler: [args]}} (default: {run_config.DEFAULT_SPACE})",
    )
    sweep.add_argument("--num-samples", type=int, default=8, help="trials (default: 8)")
    sweep.add_argument(
        "--max-concurrent-trials", type=int, default=1, help="trials at once (default: 1)"
    )
    sweep.add_argument(
        "--max-epochs",
        type=int,
        default=0,
        help="epochs of a trial that ASHA never stops (default: --epochs)",
    )
    sweep.add_argument(
        "--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial (1)"
    )
    sweep.add_argument(
        "--reduction-factor", type=int, default=2, help="ASHA keeps 1 in this many per rung (2)"
    )
    run_config.add_arguments(p)


def tune(args: argparse.Namespace) -> int:
    from steelseg.training import sweep

    base = run_config.from_args(args)
    if args.max_epochs:
        base = base.replace(epochs=args.max_epochs)
    space = (
        sweep.read_space_file(args.search_space) if args.search_space else run_config.DEFAULT_SPACE
    )
    result = sweep.sweep(
        base,
        space,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent_trials,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
    )
    print(result.table.drop(columns=["run_dir"]).to_string(index=False))
    print(f"best trial {result.best_trial}: val Dice {result.best_score:.4f}")
    print(f"best config:     {result.best_config}")
    print(f"best checkpoint: {result.best_checkpoint}")
    print(f"tensorboard:     {tensorboard_command(result.sweep_dir)}")
    return 0


TRAIN = Command(
    "train",
    "train (or resume) a model on Ray: the demo with no arguments",
    run_config.add_arguments,
    train,
    TRAIN_DESCRIPTION,
)
TUNE = Command(
    "tune", "search the config with Ray Tune and ASHA", tune_arguments, tune, TUNE_DESCRIPTION
)
