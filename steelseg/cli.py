"""The ``steelseg`` command: ``synth``, ``validate`` and the other data tools.

Errors a user can fix are printed as one line on stderr, with exit status 1.
"""

import argparse
import sys
from collections.abc import Callable, Sequence

from steelseg import catalog, synth
from steelseg.errors import SteelsegError

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
    print(format_summary(catalog.summary(table)))
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s) in {args.data_dir}")
    return 1 if problems else 0


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.run, args)


def run_command(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
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
