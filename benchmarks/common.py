"""What every benchmark records with its figures: date, machine, versions and the command, and a
plain-text table for the console. Benchmarks import it as ``from common import ...`` (they run as
scripts from any folder: ``python benchmarks/bench_x.py``)."""

import contextlib
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "torchvision", "ray", "numpy", "albumentations", "pillow", "steelseg")


def machine() -> str:
    """CPU model and cores, and the GPU if torch sees one."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    described = f"{cpu}, {os.cpu_count()} cores"
    try:
        import torch

        if torch.cuda.is_available():
            described += f", {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return described


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def record(rows: list[dict], path: str | os.PathLike, **extra) -> Path:
    """Write ``rows`` with date, machine, versions and the command line as JSON; a bare name goes
    to ``benchmarks/results/``."""
    path = Path(path)
    if path.parent == Path("."):
        path = RESULTS / path
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "versions": versions(),
        "command": "python " + " ".join(sys.argv),
        **extra,
        "rows": rows,
    }
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"written: {path}")
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """Rows as aligned text columns; floats with 2 decimals (3 below 1)."""

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"
        return "" if value is None else str(value)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def start_ray_data_actors() -> None:
    """Start Ray Data's autoscaling coordinator (and its stats actor) with a dataset of one row,
    as Ray Train's controller starts the coordinator before a run's workers exist: a
    benchmark's dataset then gets its CPU limit as a Train worker's does, at the executor's
    first refresh, not after the seconds a job's first coordinator takes to start."""
    import ray

    ray.data.range(1, override_num_blocks=1).materialize()
