"""The sweep that test_sweep.py checks, run as a user runs one without a cluster: the sweep job
twice, each time starting a local Ray of its own (in a temp folder of the test's,
``RAY_TMPDIR``), the sweep in the test bucket. conftest.py starts it in a thread, beside the
shared train run and the tests without Ray.

Whatever a local Ray leaves when its driver ends is ended by its process tree: the processes
whose environment names that temp folder.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raynodes import end_trees

from steelseg.storage import Location, locate

# In this order, one at a time: a learning rate that learns, then one that cannot, which ASHA
# must stop early; the sweep is interrupted after those two (ASHA's rungs are not part of Tune's
# saved state, so only trials of one run are compared). The one that learns is 1e-3: after the
# first epoch (ASHA's rung) it scored 0.896 against the 0.8125 of the one that cannot, where
# 3e-3 had overshot to 0.809 (and ASHA rightly kept both) on a machine with AVX-512.
LRS = [1e-3, 1e-6, 3e-3]
SPACE_FILE = "lr: {grid: [0.001, 0.000001, 0.003]}\n"


def histories(sweep_dir: Location) -> dict[str, str]:
    found = {}
    for trial in (sweep_dir / "trials").children():
        if (trial / "history.jsonl").is_file():
            found[trial.name] = (trial / "history.jsonl").read_text()
    return found


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(3)  # each look reads the sweep state from the store


def trial_statuses(sweep_dir: Location) -> dict[str, str]:
    from ray.tune import ExperimentAnalysis

    if not any(c.name.startswith("experiment_state-") for c in sweep_dir.children()):
        return {}  # not started yet
    try:
        analysis = ExperimentAnalysis(sweep_dir.path, storage_filesystem=sweep_dir.fs)
    except (ValueError, OSError):  # the state file caught while Tune rewrites it: look again
        return {}
    return {Path(t.path).name: t.status for t in analysis.trials}


def processes_in(folder: Path) -> list[int]:
    """The processes whose environment has ``RAY_TMPDIR=folder``: a local Ray started there and
    its workers (all inherit the driver's environment)."""
    wanted = f"RAY_TMPDIR={folder}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if wanted in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    found.append(int(entry))
            except OSError:  # ended meanwhile, or not ours to read
                continue
    return found


def run_sweep(data: Path, storage: str, space: Path) -> tuple[Location, tuple, str]:
    """The sweep job run twice: killed (SIGINT) once two trials have finished, then rerun with
    the same --name. Returns the sweep folder, (trial statuses, histories) at the interruption
    and the rerun's output (printed results, then logged messages)."""
    space.write_text(SPACE_FILE)
    # 2 epochs: ASHA's one rung is after the first, by which batches of 2 have given the
    # learning rate that learns 24 steps
    argv = [
        sys.executable, "-m", "ray_jobs.tune", "--search-space", str(space),
        "--num-samples", "1", "--max-concurrent-trials", "1", "--max-epochs", "2",
        "--grace-period", "1", "--reduction-factor", "2",
        "--data", str(data), "--storage", storage, "--name", "sweep",
        "--batch-size", "2", "--crop-height", "32", "--crop-width", "96",
        "--num-workers", "1", "--warmup-steps", "2",
        "--val-fraction", "0.25", "--log-images", "0", "--keep-checkpoints", "1", "--seed", "1",
        "--arch", "unet-resnet18",  # half the paper network's step time; the shared run has that
    ]  # fmt: skip
    # short: Ray's unix sockets live below it, and their paths may not pass 107 bytes
    folder = Path(tempfile.mkdtemp(prefix="steelseg-sweep-", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(folder)}
    # as on the test cluster (raynodes.py)
    env |= {"RAY_enable_metrics_collection": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):  # no cluster: the job starts its own Ray
        env.pop(name, None)
    root = Path(__file__).parents[1]
    sweep_dir = locate(storage, "storage") / "sweep"
    try:
        first = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.DEVNULL)
        try:
            wait_for(
                lambda: list(trial_statuses(sweep_dir).values()).count("TERMINATED") == 2,
                timeout=600,
                what="two finished trials",
            )
            first.send_signal(signal.SIGINT)
            first.wait(timeout=120)
        finally:
            first.kill()
        end_trees(processes_in(folder))  # anything its Ray left
        at_interruption = trial_statuses(sweep_dir), histories(sweep_dir)
        rerun = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        return sweep_dir, at_interruption, rerun.stdout + rerun.stderr
    finally:
        end_trees(processes_in(folder))
        shutil.rmtree(folder, ignore_errors=True)
