"""Training progress on the console: one line per epoch, and a progress bar within the epoch
when the output is a terminal. Fed with the events ``steelseg.training.progress`` relays from
rank 0."""

import math
import sys
import time
from typing import Any, TextIO

BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def epoch_line(metrics: dict[str, Any], epochs: int, left_s: float | None) -> str:
    """``epoch 3/8: train loss ..., val Dice ... (all-empty ..., defects ...), N img/s, ~T left``"""

    def show(key: str) -> str:
        value = metrics.get(key)
        return (
            "n/a"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else (f"{value:.4f}")
        )

    line = (
        f"epoch {metrics['epoch']}/{epochs}: train loss {show('train_loss')}, "
        f"val loss {show('val_loss')}, val Dice {show('val_kaggle_dice')} "
        f"(all-empty {show('val_empty_baseline')}, defects {show('val_dice_nonempty')}), "
        f"{metrics['images_per_s']:.1f} img/s"
    )
    if left_s is not None and metrics["epoch"] < epochs:
        line += f", ~{format_duration(left_s)} left"
    return line


class Display:
    """Shows the events of a run of ``epochs`` epochs on ``stream``."""

    def __init__(self, epochs: int, stream: TextIO | None = None, bar: bool | None = None):
        self.epochs = epochs
        self.stream = stream or sys.stdout
        self.bar = self.stream.isatty() if bar is None else bar
        self.epoch_started: float | None = None  # at the epoch's first batch
        self.bar_shown = False

    def show(self, event: tuple) -> None:
        if event[0] == "step":
            _, epoch, batch, batches, loss = event
            if self.epoch_started is None:
                self.epoch_started = time.monotonic()
            if self.bar:
                done = round(BAR_WIDTH * batch / max(batches, 1))
                bar = "#" * done + "." * (BAR_WIDTH - done)
                text = f"\repoch {epoch}/{self.epochs} [{bar}] {batch}/{batches} loss {loss:.4f}"
                self.stream.write(text)
                self.stream.flush()
                self.bar_shown = True
            return
        metrics = event[1]
        # this epoch's time from its first batch (not Ray's start-up) times the epochs left
        now = time.monotonic()
        left = (now - (self.epoch_started or now)) * (self.epochs - metrics["epoch"])
        self.epoch_started = None
        self._clear_bar()
        print(epoch_line(metrics, self.epochs, left), file=self.stream, flush=True)

    def _clear_bar(self) -> None:
        if self.bar_shown:
            self.stream.write("\r" + " " * (BAR_WIDTH + 48) + "\r")
            self.bar_shown = False

    def finish(self) -> None:
        self._clear_bar()
