"""Rank 0's TensorBoard log of a run, free of Ray: the curves of every epoch and its validation
figure, in ``<run>/tensorboard/``.

A run in a local or shared folder is written in place. A run in an object store is written to a
local staging folder, a new event file each epoch, and each file is uploaded once, when its epoch
ends and it is closed: an object store cannot append, so a file that grew every epoch would be
uploaded whole every epoch (time quadratic in epochs, while the other ranks wait at the next
collective).
"""

import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np

from steelseg.evaluation.figures import truth_vs_prediction
from steelseg.storage import Location


class EpochLog:
    """The writer of a run's TensorBoard folder ``folder``, from ``global_step`` on.

    ``writer`` is a ``SummaryWriter``; ``end_epoch`` closes an epoch (flushed, and uploaded when
    staged); ``close`` ends the log.
    """

    def __init__(self, folder: Location, global_step: int):
        self.folder = folder
        self.staging: Path | None = None
        if not folder.local:
            # one staging folder per run, which a restarted attempt reuses: an attempt that is
            # killed (a failed worker, a trial ASHA stops) cannot remove its own. It starts
            # empty: what an earlier attempt staged is in the bucket already, or past the
            # checkpoint and purged; uploaded again, it would repeat epochs
            key = hashlib.sha1(folder.uri.encode()).hexdigest()[:12]
            self.staging = Path(tempfile.gettempdir()) / f"steelseg-tensorboard-{key}"
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir()
        # purge_step drops events a crashed attempt wrote past the checkpoint we resume from;
        # the checkpointed epoch's own curves were logged at its last step, so they stay
        self.writer = self._open(global_step + 1 if global_step else None)

    def _open(self, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.staging or self.folder.path), purge_step=purge_step)

    def end_epoch(self) -> None:
        """Flush the epoch's events; when staged, upload its file and start the next one."""
        if self.staging is None:
            self.writer.flush()
            return
        self.writer.close()
        self._upload(self.staging)
        self.writer = self._open(None)

    def close(self) -> None:
        self.writer.close()
        if self.staging is not None:
            self._upload(self.staging)
            shutil.rmtree(self.staging, ignore_errors=True)

    def _upload(self, staging: Path) -> None:
        """Every closed file of the staging folder, once: uploaded, then removed here."""
        for file in sorted(staging.iterdir()):
            (self.folder / file.name).write_bytes(file.read_bytes())
            file.unlink()


def log_epoch(writer, metrics: dict, samples: list, step: int) -> None:
    """Epoch-level curves on the same step axis as the per-step loss, and the validation
    figure (truth above prediction)."""
    writer.add_scalar("loss/train", metrics["train_loss"], step)
    writer.add_scalar("loss/val", metrics["val_loss"], step)
    writer.add_scalar("lr", metrics["lr"], step)
    writer.add_scalar("epoch", metrics["epoch"], step)
    for phase in ("data_wait", "step", "validate"):
        writer.add_scalar(f"time/{phase}", metrics[f"time_{phase}_s"], step)
    for key, value in metrics.items():
        if key.startswith("val_") and key != "val_loss" and np.isfinite(value):
            writer.add_scalar(f"val/{key.removeprefix('val_')}", value, step)
    if samples:
        figure = truth_vs_prediction([(i.numpy(), t.numpy(), p.numpy()) for i, t, p in samples])
        writer.add_image("val/truth_vs_prediction", figure, step, dataformats="HWC")
