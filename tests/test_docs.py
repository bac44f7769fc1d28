"""The docs against the code. Every ``steelseg ...``, ``python ray_jobs/...``, ``python
benchmarks/...`` and ``ray job submit ... -- ...`` line of README.md, CHANGELOG.md and docs/
parses with the real argument parser (an unknown flag or command fails); every relative link,
anchor, repository path and ``steelseg.`` name they give exists; every option of every command is
documented; and the README's set-up commands are the ones .ci/run runs."""

import argparse
import contextlib
import importlib
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from steelseg.cli import build_parser
from steelseg.errors import SteelsegError

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"", "bash", "sh", "shell", "console"}  # fenced blocks read as commands
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
ELLIPSIS = "..."  # "and more flags": the line is checked for what it names, not for completeness
PARSER = build_parser()


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def prose(text: str) -> str:
    """The text outside fenced blocks."""
    return FENCE.sub("", text)


def shell_lines(text: str) -> list[str]:
    """The logical lines of the shell blocks, continuations joined."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang in SHELL:
            lines += body.replace("\\\n", " ").splitlines()
    return lines


def segments(line: str) -> list[list[str]]:
    """A shell line's simple commands as token lists (split at ``&&``, ``;``, ``|``, ``&``
    and ``$(``), comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out: list[list[str]] = [[]]
    for token in lexer:
        if set(token) <= set("();<>&|"):
            out.append([])
        else:
            out[-1].append(token)
    return [s for s in out if s]


def program(tokens: list[str]) -> list[str]:
    """The command without its env assignments (``RAY_AUTH_MODE=token ray ...``), with
    ``.venv/bin/NAME`` and ``python3`` read as NAME and ``python``."""
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return tokens
    name = tokens[0].removeprefix(".venv/bin/")
    return ["python" if name == "python3" else name, *tokens[1:]]


def steelseg_argv(tokens: list[str]) -> list[str] | None:
    """The ``steelseg`` arguments a command line runs (the entry points in ray_jobs/ and
    ``ray job submit``'s entrypoint included), or None for another program."""
    tokens = program(tokens)
    name, rest = (tokens[0], tokens[1:]) if tokens else ("", [])
    if name == "steelseg":
        return rest
    if name == "python" and rest[:2] == ["-m", "steelseg"]:
        return rest[2:]
    if name == "python" and rest and re.fullmatch(r"ray_jobs/\w+\.py", rest[0]):
        return [Path(rest[0]).stem, *rest[1:]]
    if name == "python" and rest[:1] == ["-m"] and rest[1].startswith("ray_jobs."):
        return [rest[1].removeprefix("ray_jobs."), *rest[2:]]
    if name == "ray" and rest[:2] == ["job", "submit"] and "--" in rest:
        return steelseg_argv(rest[rest.index("--") + 1 :])
    return None


def inline_commands(text: str) -> list[str]:
    """Inline code that is a command line: ``steelseg ...`` or ``python ...``."""
    return [s for s in INLINE.findall(prose(text)) if s.startswith(("steelseg ", "python "))]


def commands(paths: list[Path]) -> list[tuple[str, list[str], bool]]:
    """(where, arguments, complete) of every steelseg command: the shell blocks' in full, inline
    code for its command and options only (prose names a command without its arguments)."""
    found = []
    for path in paths:
        text = read(path)
        for line in shell_lines(text):
            for tokens in segments(line):
                argv = steelseg_argv(tokens)
                if argv is not None:
                    found.append((f"{path.name}: {line.strip()}", argv, ELLIPSIS not in argv))
        for span in inline_commands(text):
            argv = steelseg_argv(shlex.split(span))
            if argv is not None:
                found.append((f"{path.name}: `{span}`", argv, False))
    return found


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in PARSER._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def check_command(where: str, argv: list[str], complete: bool) -> None:
    """A complete line parses with the real parser, and a train or tune config is built from it
    (so its values pass the config's checks); any line names a command and its options."""
    argv = [a for a in argv if a != ELLIPSIS]
    if not argv or argv[0].startswith("-"):  # steelseg --help, --version
        assert all(a in PARSER._option_string_actions for a in argv), where
        return
    assert argv[0] in subcommands(), f"{where}: steelseg has no command {argv[0]!r}"
    options = subcommands()[argv[0]]._option_string_actions
    for flag in (a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")):
        assert flag in options, f"{where}: steelseg {argv[0]} has no option {flag}"
    if not complete:
        return
    try:
        args = PARSER.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: the parser refuses it")
    if argv[0] in ("train", "tune"):
        from steelseg.config import from_args

        named = ROOT / args.config if args.config else None
        # a config file of this repository is read; one the user makes (best_config.yaml) not
        args.config = str(named) if named and named.is_file() else None
        from_args(args)


FOUND = commands(DOCS)


def test_the_docs_name_commands_of_every_kind():
    where = "\n".join(w for w, _, _ in FOUND)
    assert len(FOUND) > 60
    for expected in ("ray_jobs/train.py", "python -m ray_jobs.train", "ray job submit",
                     "steelseg predict", "steelseg evaluate", "steelseg figures",
                     "steelseg tensorboard", "steelseg synth", "steelseg validate"):  # fmt: skip
        assert expected in where, expected


@pytest.mark.parametrize(("where", "argv", "complete"), FOUND, ids=[w for w, _, _ in FOUND])
def test_every_steelseg_command_in_the_docs_parses(where, argv, complete):
    check_command(where, argv, complete)


@pytest.mark.parametrize(
    "line",
    [
        "steelseg train --epochs 3 --no-such-flag 1",  # an unknown flag
        "steelseg frobnicate runs/demo",  # a command that does not exist
        "python ray_jobs/train.py --crop-height 100 --crop-width 160",  # a value the config refuses
        # required arguments missing, after ray job submit's --
        "RAY_AUTH_MODE=token ray job submit --working-dir . -- python -m ray_jobs.predict --tta",
        "steelseg predict --checkpoint RUN --images DIR --actor 2",  # a prefix: argparse takes it
    ],
)
def test_a_line_that_does_not_parse_fails(line, tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(f"```bash\n{line}\n```\n")
    ((where, argv, complete),) = commands([doc])
    with pytest.raises((AssertionError, pytest.fail.Exception, SteelsegError)):
        check_command(where, argv, complete)


def test_inline_code_does_not_cross_lines():
    """An inline span broken over two lines would hide its command from the checks."""
    for path in DOCS:
        for number, line in enumerate(prose(read(path)).splitlines(), start=1):
            assert line.count("`") % 2 == 0, f"{path.name}: line {number}: {line}"


def ray_submit_lines() -> list[list[str]]:
    return [
        program(tokens)
        for path in DOCS
        for line in shell_lines(read(path))
        for tokens in segments(line)
        if program(tokens)[:3] == ["ray", "job", "submit"]
    ]


def test_ray_job_submit_lines_take_rays_own_options():
    """What comes before ``--`` is parsed by Ray's own CLI (click), without running it."""
    import click
    from ray.dashboard.modules.job.cli import submit

    lines = ray_submit_lines()
    assert len(lines) >= 5
    for tokens in lines:
        with submit.make_context("submit", [*tokens[3 : tokens.index("--")], "--", "true"]):
            pass
    with pytest.raises(click.exceptions.NoSuchOption):  # the check can fail
        submit.make_context("submit", ["--adress", "http://127.0.0.1:8265", "--", "true"])


class Parsed(Exception):
    """Raised in place of running a benchmark, once its parser took the line."""


def benchmark_lines() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every ``python benchmarks/...`` line, in blocks or inline."""
    found = []
    for path in DOCS:
        text = read(path)
        lines = [*shell_lines(text), *inline_commands(text)]
        for line in lines:
            for tokens in map(program, segments(line)):
                if tokens[:1] == ["python"] and tokens[1:2] and tokens[1].startswith("benchmarks/"):
                    found.append((f"{path.name}: {line.strip()}", tokens[1:]))
    return found


BENCHMARKS = benchmark_lines()


@pytest.mark.parametrize(("where", "argv"), BENCHMARKS, ids=[w for w, _ in BENCHMARKS])
def test_every_benchmark_command_in_the_docs_parses(where, argv, monkeypatch):
    """The benchmark's own parser reads the line; parse_args then raises instead of returning,
    so nothing is measured."""
    script = ROOT / argv[0]
    assert script.is_file(), f"{where}: no {argv[0]}"
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        try:
            parse_args(self, args, namespace)
        except SystemExit:
            pytest.fail(f"{where}: the parser refuses it")
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *argv[1:]])
    monkeypatch.syspath_prepend(str(script.parent))  # benchmarks import their common module
    with pytest.raises(Parsed):
        runpy.run_path(str(script), run_name="__main__")


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# a path of this repository in the docs' text: a top-level folder, then a path
PATH = re.compile(
    r"(?<![\w/.~$@:-])((?:steelseg|ray_jobs|cluster|benchmarks|tests|docs|\.ci)/[\w./*-]*\w)"
)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for a page's headings."""
    headings = re.findall(r"^#+ (.+)$", prose(read(path)), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_relative_link_and_anchor_exists(doc):
    for target in LINK.findall(read(doc)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        page = (doc.parent / file).resolve() if file else doc
        assert page.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor:
            assert anchor in anchors(page), f"{doc.name}: link to {target}: no such heading"


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_repository_path_named_exists(doc):
    for name in PATH.findall(read(doc)):
        assert list(ROOT.glob(name)), f"{doc.name}: {name} does not exist"


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_steelseg_name_in_inline_code_exists(doc):
    """``steelseg.x.y`` is a module, or an attribute of one."""
    for span in INLINE.findall(prose(read(doc))):
        match = re.fullmatch(r"(steelseg(?:\.\w+)+)(?:\(.*\))?", span)
        if not match:
            continue
        parts = match.group(1).split(".")
        cut, target = 1, importlib.import_module("steelseg")
        for end in range(len(parts), 1, -1):
            with contextlib.suppress(ImportError):
                cut, target = end, importlib.import_module(".".join(parts[:end]))
                break
        for attribute in parts[cut:]:
            assert hasattr(target, attribute), f"{doc.name}: {span}: no {attribute}"
            target = getattr(target, attribute)


def test_every_option_of_every_command_is_in_the_docs():
    """Any option is found in docs/ with one search."""
    text = "\n".join(read(p) for p in (ROOT / "docs").glob("*.md"))
    missing = [
        f"steelseg {name} {action.option_strings[0]}"
        for name, sub in subcommands().items()
        for action in sub._actions
        if action.option_strings and action.dest not in ("help", "verbose")
        if not any(
            re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", text) for o in action.option_strings
        )
    ]
    assert not missing, missing


def test_the_training_options_tables_have_every_field_with_its_default():
    from steelseg.config import FIELDS, TrainConfig, _show

    table = read(ROOT / "docs/training.md")
    documented = dict(re.findall(r"^\| `(--[\w-]+)[^`]*` \| `([^`]*)` \|", table, re.M))
    defaults = TrainConfig().to_dict()
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        assert flag in documented, f"docs/training.md: no row for {flag}"
        assert documented[flag] == _show(defaults[name]), f"docs/training.md: {flag}'s default"


def readme_setup() -> tuple[str, str]:
    """The README's two set-up commands: install and run the main job; install and test."""
    section = read(ROOT / "README.md").split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    main_job, tests = (body.strip() for lang, body in FENCE.findall(section) if lang in SHELL)
    return main_job, tests


def steps(command: str) -> list[list[str]]:
    """A command's steps as token lists, pip's ``-q`` dropped (CI is quieter, not different)."""
    return [[t for t in s if t != "-q"] if s[0].endswith("pip") else s for s in segments(command)]


def test_the_readmes_test_command_is_what_ci_runs():
    _, tests = readme_setup()
    lines = (ROOT / ".ci/run").read_text().splitlines()
    ci = [step for line in lines if not line.startswith("#") for step in steps(line)]
    places = [ci.index(step) for step in steps(tests)]  # each step, in this order
    assert places == sorted(places)
    assert ci[places[-1] - 3 : places[-1]] == [  # linted and type-checked before the tests
        [".venv/bin/ruff", "check", "."],
        [".venv/bin/ruff", "format", "--check", "."],
        [".venv/bin/mypy"],
    ]


def test_the_readmes_main_job_command_installs_as_the_tests_do_and_runs_the_demo():
    main_job, tests = readme_setup()
    venv, install, run = steps(main_job)
    test_venv, test_install, _ = steps(tests)
    assert venv == test_venv
    assert install == ["." if t == ".[test]" else t for t in test_install]  # no extra
    assert run == [".venv/bin/python", "ray_jobs/train.py"]  # the demo: no arguments


def test_the_api_page_lists_every_public_name():
    import steelseg

    page = read(ROOT / "docs/api.md")
    for name in steelseg.__all__:
        assert re.search(rf"^\| [^|]*`{name}\b", page, re.M), f"docs/api.md: no row for {name}"
