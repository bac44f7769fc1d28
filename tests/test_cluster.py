"""Which Ray a job uses: RAY_ADDRESS, a running ``ray start`` cluster, or a new local one; the
decisions with Ray's ``init`` recorded, and the real attach on the test cluster."""

import logging
import socket
from pathlib import Path

import pytest

from steelseg.cluster import init_ray
from steelseg.errors import SteelsegError


@pytest.fixture
def calls(monkeypatch, tmp_path):
    """ray.init recorded instead of run; Ray's temp folder in tmp_path."""
    import ray

    made = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: made.append(kwargs))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return made


def record(tmp_path: Path, address: str) -> None:
    (tmp_path / "ray").mkdir(exist_ok=True)
    (tmp_path / "ray" / "ray_current_cluster").write_text(address + "\n")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_cluster_starts_a_local_ray_with_enough_cpus(calls):
    assert init_ray(64) == ""
    assert calls[0]["address"] == "local" and calls[0]["num_cpus"] == 64


def test_a_dead_recorded_cluster_is_reported_and_a_local_ray_started(calls, tmp_path, caplog):
    dead = f"127.0.0.1:{closed_port()}"
    record(tmp_path, dead)
    with caplog.at_level(logging.WARNING, logger="steelseg"):
        assert init_ray(2) == ""
    assert calls[0]["address"] == "local"
    assert f"({dead}) is not running; starting a local Ray" in caplog.text


def test_a_running_recorded_cluster_is_attached_to(calls, tmp_path):
    with socket.socket() as listener:  # stands in for the GCS of a ray start cluster
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        record(tmp_path, address)
        assert init_ray(2) == address
    assert calls == [{"address": "auto", "log_to_driver": False, "logging_level": logging.ERROR}]


def test_ray_address_that_does_not_answer_is_a_one_line_error(calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    with pytest.raises(SteelsegError, match="RAY_ADDRESS 127.0.0.1:.*: no Ray cluster answers"):
        init_ray(2)
    assert calls == []


def test_train_job_attaches_to_a_running_cluster_and_prints_only_progress(cluster, trained_run):
    """The shared run's first part is the README's main command with a `ray start` cluster
    running on the machine."""
    run_dir, _, job, _ = trained_run
    attached = f"attached to the running Ray cluster at {cluster.address} (started with ray start)"
    assert job.stderr.strip() == attached
    lines = job.stdout.strip().splitlines()
    assert lines[0].startswith("epoch 1/1: train loss ") and "img/s" in lines[0]
    assert lines[1].startswith("finished epoch 1: val Dice")
    assert lines[2] == f"run:         {run_dir.target}"
    assert any(line.strip().startswith("steelseg calibrate") for line in lines)
    assert len(lines) == 9, job.stdout  # nothing else: no Ray logs, no metric dicts, no warnings
