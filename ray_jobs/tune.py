"""Search learning rate and loss weights (or any config field) with Ray Tune and ASHA.

    python ray_jobs/tune.py --data /data/severstal --storage /shared/runs --name sweep1 \\
        --num-samples 16 --max-concurrent-trials 2 --num-workers 2 --use-gpu --max-epochs 20
    python ray_jobs/tune.py --search-space space.yaml ...   # e.g. {lr: {loguniform: [1e-4, 1e-2]}}

Every training flag sets the base config of all trials. Rerunning with the same --storage and
--name restores an interrupted sweep without rerunning finished trials.
"""

import argparse
import sys

from steelseg import config as run_config
from steelseg.cli import run_command
from steelseg.training import sweep as tune


def run(args: argparse.Namespace) -> int:
    base = run_config.from_args(args)
    if args.max_epochs:
        base = base.replace(epochs=args.max_epochs)
    space = tune.read_space_file(args.search_space) if args.search_space else tune.DEFAULT_SPACE
    tune.sweep(
        base,
        space,
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent_trials,
        grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--search-space",
        help=f"YAML file: config key -> {{sampler: [args]}} (default: {tune.DEFAULT_SPACE})",
    )
    parser.add_argument("--num-samples", type=int, default=8, help="trials (default: 8)")
    parser.add_argument(
        "--max-concurrent-trials", type=int, default=1, help="trials at once (default: 1)"
    )
    parser.add_argument(
        "--max-epochs",
        type=int,
        default=0,
        help="epochs of a trial that ASHA never stops (default: --epochs)",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=1,
        help="epochs before ASHA may stop a trial (default: 1)",
    )
    parser.add_argument(
        "--reduction-factor",
        type=int,
        default=2,
        help="ASHA keeps 1 in this many trials per rung (default: 2)",
    )
    run_config.add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
