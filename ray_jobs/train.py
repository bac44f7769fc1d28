"""`steelseg train` as an entry point for `ray job submit`:

    ray job submit --working-dir . -- python -m ray_jobs.train ...

Takes the same flags as `steelseg train` (`--help` lists them).
"""

import sys

from steelseg.cli import main as steelseg


def main(argv: list[str] | None = None) -> int:
    return steelseg(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
