"""`steelseg predict` as an entry point for `ray job submit`:

    ray job submit --working-dir . -- python -m ray_jobs.predict ...

Takes the same flags as `steelseg predict` (`--help` lists them).
"""

import sys

from steelseg.cli import main as steelseg


def main(argv: list[str] | None = None) -> int:
    return steelseg(["predict", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
