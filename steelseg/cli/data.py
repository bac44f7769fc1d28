"""Data commands: ``synth`` writes a synthetic data set, ``validate`` checks a data folder."""

import argparse

from steelseg.cli.command import Command
from steelseg.domain import CLASS_IDS
from steelseg.errors import SteelsegError

# the real data's statistics (../shared/DATA.md), printed next to a data set's
REAL_MASK_SHARE = {1: 0.13, 2: 0.03, 3: 0.73, 4: 0.11}
REAL_MEAN_AREA = {1: 0.011, 2: 0.008, 3: 0.062, 4: 0.084}


def synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="folder to create (or an empty one)")
    p.add_argument("--images", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--height", type=int, default=256, help="image height (default 256)")
    p.add_argument("--width", type=int, default=1600, help="image width (default 1600)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--modalities", default="visible", help="comma list, e.g. visible,ir (default visible)"
    )
    p.add_argument("--processes", type=int, default=None, help="worker processes (default: cores)")


def synth(args: argparse.Namespace) -> int:
    from steelseg.data import synth

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


def validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_dir", help="folder or s3:// / gs:// URI with train.csv and train_images/")
    p.add_argument("--size", help="required HEIGHTxWIDTH (default: the most common size)")
    p.add_argument(
        "--modalities", default="visible", help="image folders to check, e.g. visible,ir"
    )


def validate(args: argparse.Namespace) -> int:
    from steelseg.data import catalog
    from steelseg.storage import shown

    modalities = args.modalities.split(",")
    size = parse_size(args.size) if args.size else None
    table, problems = catalog.scan(args.data_dir, modalities=modalities, expected_size=size)
    print(format_summary(catalog.summary(table, problems)))
    for problem in problems:
        print(problem)
    print(f"{len(problems)} problem(s) in {shown(args.data_dir)}")
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
    for c in CLASS_IDS:
        share = s["masks"][c] / total
        area = s["mean_area_fraction"][c]
        lines.append(
            f"{c:>5}  {s['masks'][c]:>5}  {share:>5.1%} ({REAL_MASK_SHARE[c]:.0%})"
            f"   {area:>6.2%} ({REAL_MEAN_AREA[c]:.1%})"
        )
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SteelsegError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 256x1600") from None
    return height, width


SYNTH = Command(
    "synth", "write a synthetic data set in the Severstal layout", synth_arguments, synth
)
VALIDATE = Command(
    "validate", "check every CSV row and image of a data folder", validate_arguments, validate
)
