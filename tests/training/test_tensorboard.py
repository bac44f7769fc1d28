"""Rank 0's TensorBoard log: in place for a local run; for a run in a bucket, staged and each
epoch's file uploaded once."""

import pytest

from steelseg import runs
from steelseg.storage import Location, locate
from steelseg.training.tensorboard import EpochLog


def write_epochs(log: EpochLog, epochs: int) -> None:
    for epoch in range(1, epochs + 1):
        for step in range(20):
            log.writer.add_scalar("train/loss_step", 1.0 / (step + 1), 20 * epoch + step)
        log.writer.add_scalar("epoch", epoch, 20 * epoch + 19)
        log.end_epoch()
    log.close()


def epochs_read(folder) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [e.value for e in EventAccumulator(str(folder)).Reload().Scalars("epoch")]


def test_a_bucket_runs_events_are_uploaded_once_each_not_again_every_epoch(
    s3, tmp_path, monkeypatch
):
    run_dir = locate(s3.uri("tensorboard-test/run"), "run")
    uploaded: list[tuple[str, int]] = []
    write_bytes = Location.write_bytes

    def counted(self, data):
        uploaded.append((self.name, len(data)))
        write_bytes(self, data)

    monkeypatch.setattr(Location, "write_bytes", counted)
    log = EpochLog(runs.tensorboard_dir(run_dir), global_step=0)
    write_epochs(log, 4)
    names = [name for name, _ in uploaded]
    assert len(names) >= 4 and len(set(names)) == len(names), names  # each file once
    stored = {k.rsplit("/", 1)[1]: len(s3.read(k)) for k in s3.keys("tensorboard-test/run/")}
    # what crossed to the store is what it holds: linear in epochs, not quadratic
    assert sum(size for _, size in uploaded) == sum(stored.values())
    assert not log.staging.exists()
    assert epochs_read(runs.fetch_tensorboard(run_dir, tmp_path / "copy")) == [1, 2, 3, 4]


@pytest.mark.parametrize("resumed_at", [0, 40])
def test_a_local_runs_events_stay_in_one_file_in_place(tmp_path, resumed_at):
    folder = locate(tmp_path / "run" / "tensorboard", "run")
    log = EpochLog(folder, global_step=resumed_at)
    assert log.staging is None
    write_epochs(log, 2)
    assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 1
    assert epochs_read(tmp_path / "run" / "tensorboard") == [1, 2]
