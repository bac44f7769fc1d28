"""Training progress without Ray: rank 0's sender, and the console's epoch line and in-epoch
bar."""

import io
import math

from steelseg.cli.progress import Display, epoch_line
from steelseg.training import progress


def metrics(epoch, **changes):
    values = {
        "epoch": epoch,
        "train_loss": 0.25,
        "val_loss": 0.125,
        "val_kaggle_dice": 0.875,
        "val_empty_baseline": 0.8125,
        "val_dice_nonempty": math.nan,
        "images_per_s": 12.34,
    }
    return {**values, **changes}


def test_epoch_line_has_losses_scores_speed_and_time_left():
    line = epoch_line(metrics(3), 8, 125.0)
    assert line == (
        "epoch 3/8: train loss 0.2500, val loss 0.1250, val Dice 0.8750 (all-empty 0.8125, "
        "defects n/a), 12.3 img/s, ~2m05s left"
    )
    assert "left" not in epoch_line(metrics(8), 8, 0.0)


class FakeQueue:
    def __init__(self):
        self.items = []

    def put_nowait(self, item):
        self.items.append(item)


def test_sender_sends_first_and_last_batch_and_at_most_twice_a_second():
    queue = FakeQueue()
    sender = progress.Sender(queue)
    for batch in range(1, 101):
        sender.step(1, batch, 100, 0.5)
    batches = [item[2] for item in queue.items]
    assert batches[0] == 1 and batches[-1] == 100 and len(batches) <= 4
    sender.epoch(metrics(1))
    assert queue.items[-1] == ("epoch", metrics(1))
    quiet = progress.Sender(None)  # the sender of ranks other than 0
    quiet._send = queue.items.append  # would record anything it sent
    sent = len(queue.items)
    for batch in (1, 2, 3):
        quiet.step(1, batch, 3, 0.5)
    quiet.epoch(metrics(1))
    assert len(queue.items) == sent


def printer(bar):
    return Display(2, io.StringIO(), bar)


def test_printer_draws_a_bar_on_a_terminal_and_replaces_it_by_the_epoch_line():
    shown = printer(bar=True)
    shown.show(("step", 1, 5, 10, 0.3))
    assert "[############............] 5/10 loss 0.3000" in shown.stream.getvalue()
    shown.show(("epoch", metrics(1)))
    last = shown.stream.getvalue().split("\r")[-1]
    assert last.startswith("epoch 1/2: train loss 0.2500") and last.endswith("left\n")


def test_printer_without_a_terminal_prints_epoch_lines_only():
    shown = printer(bar=False)
    shown.show(("step", 1, 5, 10, 0.3))
    shown.show(("epoch", metrics(1)))
    shown.show(("epoch", metrics(2)))
    lines = shown.stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2") and "\r" not in lines[0]
