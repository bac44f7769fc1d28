"""The ``steelseg`` command, the one front end: every command is listed in ``COMMANDS`` and
defined in the module of its part; ``ray_jobs/*.py`` are entry points for ``ray job submit`` that
run the same commands. Only the front end prints: the library logs through ``logging`` and
returns results, which the commands format here.

Errors a user can fix are printed as one line on stderr, with exit status 1.
"""

import argparse
import logging
import sys
from collections.abc import Sequence

from steelseg import __version__
from steelseg.cli import data, evaluation, inference, training
from steelseg.cli.command import Command
from steelseg.errors import SteelsegError

COMMANDS: tuple[Command, ...] = (
    training.TRAIN,
    training.TUNE,
    inference.PREDICT,
    inference.CALIBRATE,
    inference.EXPORT,
    inference.SERVE,
    evaluation.EVALUATE,
    evaluation.FIGURES,
    evaluation.TENSORBOARD,
    data.SYNTH,
    data.VALIDATE,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="steelseg",
        description="Train, tune and use steel-defect segmentation models on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"steelseg {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(
            command.name,
            help=command.help,
            description=command.description or command.help,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(sub)
        sub.add_argument(
            "--verbose", action="store_true", help="debug messages, and Ray's logs when it starts"
        )
        # not "run": a command may take an argument of that name (tensorboard's RUN)
        sub.set_defaults(handler=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        return args.handler(args)
    except SteelsegError as e:
        print_error(e)
        return 1
    except KeyboardInterrupt:  # Ctrl-C, or `ray job stop` (see steelseg.cluster.init_ray)
        print("steelseg: stopped", file=sys.stderr)
        return 130


def print_error(error: SteelsegError) -> None:
    """One line, or for a data set with problems one line per problem and a last one."""
    problems = getattr(error, "problems", None)  # catalog.DataProblems
    if problems is None:
        print(f"steelseg: error: {error}", file=sys.stderr)
        return
    for problem in problems:
        print(problem, file=sys.stderr)
    print(
        f"steelseg: error: {len(problems)} data problem(s); fix them or drop the images they "
        "concern with --drop-bad",
        file=sys.stderr,
    )


class _Formatter(logging.Formatter):
    """Our messages as plain lines; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"steelseg: {record.levelname.lower()}: {message}"
        return message


def setup_logging(verbose: bool = False) -> None:
    """steelseg's messages on stderr, info and above (debug with ``verbose``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("steelseg")
    # replace the handler of an earlier call (a test, a notebook) but keep any other
    root.handlers[:] = [h for h in root.handlers if not isinstance(h.formatter, _Formatter)]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
