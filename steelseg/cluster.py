"""Setting up Ray for a job: attach to the cluster a job runs on, or start a local one.

``RAY_ADDRESS`` (set under ``ray job submit``, or by the user, with ``RAY_AUTH_MODE=token`` for a
cluster with token authentication) is attached to. Without it, a
cluster started on this machine with ``ray start`` (whose address Ray records in
``<temp dir>/ray_current_cluster``) is attached to if it is running; a record left by a cluster
that died is ignored and a local Ray is started instead of waiting on the dead address.
"""

import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steelseg.errors import SteelsegError
from steelseg.storage import Location

log = logging.getLogger(__name__)


def default_temp_dir() -> Path:
    """Where ``ray start`` keeps its files by default, as Ray finds it."""
    return Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"


def recorded_address() -> tuple[Path, str]:
    """The record file of the last ``ray start`` cluster and the address in it ('' if none)."""
    record = default_temp_dir() / "ray_current_cluster"
    try:
        return record, record.read_text().strip()
    except OSError:
        return record, ""


def answers(address: str, timeout: float = 2.0) -> bool:
    """Whether something listens at a GCS ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def init_ray(num_cpus: int, *, verbose: bool = False, progress_bars: bool = False) -> str:
    """Attach to the job's cluster or start a local Ray with ``num_cpus`` CPUs (at least), and
    set Ray Data's context for this driver: its progress bars only with ``progress_bars``.

    ``verbose`` shows Ray's own logs and the workers' output; otherwise only warnings.

    Returns:
        The address attached to, or '' for a new local Ray.

    Raises:
        SteelsegError: ``RAY_ADDRESS`` names a cluster that does not answer.
    """
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress_bars
    context.print_on_execution_start = False
    # as ray.init's logging_level below, which does not reach Ray Data's loggers: they have
    # handlers of their own, and print each execution in this driver (prediction) at INFO
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.ERROR)
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = _init(num_cpus, verbose)
    stop_as_interrupt()  # after ray.init, which installs a SIGTERM handler of its own
    return address


def stop_as_interrupt():
    """Take SIGTERM (what `ray job stop` and Kubernetes send) as Ctrl-C, which Ray Train and
    Tune answer by ending the run cleanly: workers stopped, their resources given back at once
    (an elastic run's reservation would otherwise hold them for minutes), a sweep's state
    saved. Returns the handler it replaced (None off the main thread, where it cannot)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame) -> None:
        log.warning("stop requested (SIGTERM): ending the run cleanly")
        signal.raise_signal(signal.SIGINT)

    return signal.signal(signal.SIGTERM, interrupt)


def _init(num_cpus: int, verbose: bool) -> str:
    import ray

    quiet: dict[str, Any] = {
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
    }
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address not in ("auto", "local"):
        gcs = address.split("://", 1)[-1]
        if "://" not in address and not answers(gcs):
            raise SteelsegError(f"RAY_ADDRESS {address}: no Ray cluster answers there")
        ray.init(address=address, **quiet)
        log.info("attached to the Ray cluster at %s (RAY_ADDRESS)", address)
        return address
    record, recorded = recorded_address()
    if recorded and answers(recorded):
        # "auto" finds the recorded cluster and, as Ray does only for a cluster found this way,
        # uses the token of a ray start cluster (~/.ray/auth_token) when there is one
        ray.init(address="auto", **quiet)
        log.info("attached to the running Ray cluster at %s (started with ray start)", recorded)
        return recorded
    if recorded:
        log.warning(
            "the Ray cluster recorded in %s (%s) is not running; starting a local Ray",
            record,
            recorded,
        )
    cpus = max(os.cpu_count() or 1, num_cpus)
    ray.init(address="local", num_cpus=cpus, include_dashboard=verbose, **quiet)
    log.info("started a local Ray with %d CPUs", cpus)
    return ""


# --- Ray's notes on this process's console ------------------------------------------------------

# Ray's C++ core prints this at its ERROR level for every Ray Data actor pool it starts (Ray
# Data passes the actors' arguments through the object store and restarts lost actors):
# ray-project/ray#57733, a note about Ray's own design that the user can do nothing about
ACTOR_ARGUMENTS_NOTE = b"has constructor arguments in the object store and max_restarts > 0"


@contextlib.contextmanager
def without_ray_notes(notes: tuple[bytes, ...] = (ACTOR_ARGUMENTS_NOTE,)):
    """Leave out of this process's stderr the lines holding one of ``notes``, while the block
    runs. Ray's core writes them to file descriptor 2 from C++, past Python's logging, so the
    descriptor itself is passed through a pipe that a thread copies; every other line reaches
    the console as it was written. A line ends at a newline or a carriage return (progress bars
    redraw after one); text that cannot be the start of Ray's log line (``[date ...``) is passed
    on at once, unfinished."""
    sys.stderr.flush()
    console = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def write(data: bytes) -> None:
        while data:
            data = data[os.write(console, data) :]

    def copy() -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, pending = LINE_ENDS.split(pending + chunk)
                write(b"".join(line for line in lines if not any(n in line for n in notes)))
                if pending and not pending.startswith(b"["):
                    write(pending)
                    pending = b""
        if not any(n in pending for n in notes):
            write(pending)

    thread = threading.Thread(target=copy, name="steelseg-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)  # the pipe's last writer closed: the thread reads to its end
        thread.join(timeout=10)
        if not thread.is_alive():  # else it may still write there: the descriptor stays open
            os.close(console)


LINE_ENDS = re.compile(rb"(?<=[\r\n])")  # splits after each, keeping it


# --- local paths on a cluster of several nodes -------------------------------------------------

SHARED_HINT = (
    "use a shared filesystem mounted at the same path on every node, or an s3:// or gs:// URI"
)


def probe(path: str, size: int, reply: bool) -> tuple[str, str]:
    """How one node sees ``path``: (what is wrong, '' if nothing; the file it wrote next to
    ``path`` when ``reply``, for the driver to look for)."""
    try:
        seen = os.path.getsize(path)
    except OSError:
        return "cannot see it", ""
    if seen != size:
        return f"sees a different file there ({seen} bytes, not {size})", ""
    if not reply:
        return "", ""
    answer = f"{path}.{uuid.uuid4().hex}"
    try:
        Path(answer).write_text(socket.gethostname())
    except OSError as e:
        return f"cannot write there ({e.strerror})", ""
    return "", answer


def on_every_node(fn: Callable, *args) -> dict[str, Any]:
    """``fn(*args)`` run once on every alive node of the cluster: node address -> result."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    calls = {
        f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(*args)
        for n in nodes
    }
    return dict(zip(calls, ray.get(list(calls.values()))))


def node_count() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"])


def check_shared(
    location: Location, what: str, *, write: bool, run: Callable = on_every_node
) -> None:
    """Refuse a local path that some node of the cluster does not see as this one does.

    A folder to ``write`` gets a marker file that every node must read and answer next to; a
    file to read must be there, the same size, on every node. Does nothing for a URI. ``run``
    runs a function on every node (``on_every_node``).

    Raises:
        SteelsegError: naming ``what``, the path and the first node that does not see it.
    """
    if not location.local:
        return
    target = location
    if write:
        location.mkdir()
        target = location / f".steelseg-shared-{uuid.uuid4().hex}"
        target.write_text("every node must see this file")
    seen: dict[str, tuple[str, str]] = {}
    try:
        seen = run(probe, target.path, Path(target.path).stat().st_size, write)
        for node, (problem, answer) in seen.items():
            if not problem and answer and not os.path.exists(answer):
                problem = "writes files there that this node does not see"
            if problem:
                raise SteelsegError(
                    f"{what} {location}: not the same on every node of the cluster (node "
                    f"{node} {problem}); {SHARED_HINT}"
                )
    finally:
        if write:
            for leftover in [target.path, *(answer for _, answer in seen.values() if answer)]:
                with contextlib.suppress(OSError):
                    os.remove(leftover)
