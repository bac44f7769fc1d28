"""Train the steel-defect U-Net on Ray: locally, or on a cluster under `ray job submit`.

    python ray_jobs/train.py                       # zero set-up demo on synthetic data
    python ray_jobs/train.py --data /data/severstal --storage /shared/runs --name r1 \\
        --num-workers 8 --use-gpu --crop-height 256 --crop-width 512
    ray job submit --working-dir . -- python ray_jobs/train.py --config run.yaml

Rerunning with the same --storage and --name resumes the run from its latest checkpoint.
"""

import argparse
import sys

from steelseg import config as run_config
from steelseg.cli import run_command
from steelseg.training.fit import fit, report_result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    run_config.add_arguments(parser)
    parser.add_argument(
        "--verbose", action="store_true", help="show Ray's logs and the workers' output"
    )
    args = parser.parse_args(argv)
    return run_command(
        lambda a: report_result(fit(run_config.from_args(a), verbose=a.verbose)),
        args,
        verbose=args.verbose,
    )


if __name__ == "__main__":
    sys.exit(main())
