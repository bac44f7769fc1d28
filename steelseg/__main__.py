"""``python -m steelseg``: the ``steelseg`` command."""

import sys

from steelseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
