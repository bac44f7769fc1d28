"""What a command of the ``steelseg`` front end is: a name, a one-line help, its arguments and
the function that runs it (returning the exit status)."""

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""  # shown by ``steelseg NAME --help``; the help line if empty
