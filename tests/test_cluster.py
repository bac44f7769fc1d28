"""Which Ray a job uses: RAY_ADDRESS, a running ``ray start`` cluster, or a new local one; the
decisions with Ray's ``init`` recorded, and the real attach on the test cluster."""

import logging
import os
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


def test_submitted_train_job_attaches_and_prints_only_progress(trained_run):
    """`ray job logs` of the shared run's first job, up to its stop: Ray's line, the job's
    first line saying where it runs, then one line an epoch, nothing else."""
    from conftest import STOPPED

    _, logs = trained_run.submitted[STOPPED]
    lines = logs.strip().splitlines()  # after the CLI's own lines
    first = lines.index(next(x for x in lines if x.startswith("Running entrypoint for job")))
    lines = lines[first : lines.index(next(x for x in lines if x.startswith("epoch 1/3"))) + 1]
    assert lines[0].startswith("Running entrypoint for job steelseg-test-stopped: python -m")
    assert lines[1].startswith("attached to the Ray cluster at ") and "(RAY_ADDRESS)" in lines[1]
    for epoch, line in enumerate(lines[2:], start=1):
        assert line.startswith(f"epoch {epoch}/3: train loss ") and "val Dice" in line
        assert "img/s" in line and "left" in line
    assert len(lines) == 3, lines  # no Ray logs, no metric dicts, no warnings


# --- local paths on several nodes --------------------------------------------------------------


def two_nodes(seen_here: Path, seen_there: Path):
    """Runs a function as two nodes would: the second sees ``seen_there`` where this machine
    has ``seen_here`` (two separate folders, as two machines without a shared disk)."""

    def run(fn, path, *args):
        return {
            "10.0.0.1": fn(path, *args),
            "10.0.0.2": fn(path.replace(str(seen_here), str(seen_there)), *args),
        }

    return run


def test_a_folder_that_every_node_sees_passes_and_keeps_no_marker(tmp_path):
    from steelseg.cluster import check_shared
    from steelseg.storage import locate

    check_shared(locate(tmp_path / "runs", "storage"), "storage", write=True,
                 run=two_nodes(tmp_path, tmp_path))  # fmt: skip
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_storage_folder_one_node_cannot_see_is_refused_in_one_line(tmp_path):
    from steelseg.cluster import check_shared
    from steelseg.storage import locate

    here, there = tmp_path / "a", tmp_path / "b"
    (there / "runs").mkdir(parents=True)
    with pytest.raises(SteelsegError) as info:
        check_shared(locate(here / "runs", "storage"), "storage", write=True,
                     run=two_nodes(here, there))  # fmt: skip
    assert str(info.value) == (
        f"storage {here / 'runs'}: not the same on every node of the cluster (node 10.0.0.2 "
        "cannot see it); use a shared filesystem mounted at the same path on every node, "
        "or an s3:// or gs:// URI"
    )
    assert list((here / "runs").iterdir()) == [] and list((there / "runs").iterdir()) == []


def test_a_data_set_that_differs_on_a_node_is_refused(tmp_path):
    from steelseg.cluster import check_shared
    from steelseg.storage import locate

    for folder, text in (("a", "ImageId,ClassId,EncodedPixels\n"), ("b", "ImageId\n")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "train.csv").write_text(text)
    csv = locate(tmp_path / "a" / "train.csv", "data")
    with pytest.raises(SteelsegError, match=r"node 10.0.0.2 sees a different file there \(8 "):
        check_shared(csv, "data", write=False, run=two_nodes(tmp_path / "a", tmp_path / "b"))
    check_shared(csv, "data", write=False, run=two_nodes(tmp_path / "a", tmp_path / "a"))


def test_every_node_of_the_test_cluster_sees_a_local_folder(cluster, tmp_path):
    from steelseg.cluster import check_shared, on_every_node
    from steelseg.storage import locate

    seen = on_every_node(lambda: os.getpid())
    assert len(seen) == 2 and len(set(seen.values())) == 2  # one answer a node
    check_shared(locate(tmp_path, "storage"), "storage", write=True)
    assert list(tmp_path.iterdir()) == []


def test_rays_note_on_actor_pools_is_left_out_of_the_console_and_nothing_else(capfd):
    """Ray's C++ core writes to file descriptor 2 itself: the filter works on the descriptor."""
    from steelseg.cluster import ACTOR_ARGUMENTS_NOTE, without_ray_notes

    note = b"[2026 E 1 1] core_worker.cc:2465: Actor 'MapWorker' " + ACTOR_ARGUMENTS_NOTE + b".\n"
    with without_ray_notes():
        os.write(2, b"before\n" + note + b"after")
        os.write(2, b" the note\n")
        os.write(2, b"\rbar 1/3\rbar 2/3\r" + note + b"bar 3/3\n[not a note]")
    os.write(2, b"restored\n")
    assert capfd.readouterr().err == (
        "before\nafter the note\n\rbar 1/3\rbar 2/3\rbar 3/3\n[not a note]restored\n"
    )
