"""Setting up Ray for a job: attach to the cluster a job runs on, or start a local one.

``RAY_ADDRESS`` (set under ``ray job submit``, or by the user, with ``RAY_AUTH_MODE=token`` for a
cluster with token authentication) is attached to. Without it, a
cluster started on this machine with ``ray start`` (whose address Ray records in
``<temp dir>/ray_current_cluster``) is attached to if it is running; a record left by a cluster
that died is ignored and a local Ray is started instead of waiting on the dead address.
"""

import logging
import os
import socket
from pathlib import Path

from steelseg.errors import SteelsegError

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
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.ERROR}
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
