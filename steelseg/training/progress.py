"""Training progress shown on the driver: one line per epoch, and a progress bar within the epoch
when the driver writes to a terminal.

Rank 0 sends events through a Ray queue (an actor that takes no CPU) that the driver drains in
a thread, so the lines appear wherever the driver's output goes (a terminal, ``ray job logs``)
while the workers' own output stays off the driver's console.
"""

import math
import sys
import threading
import time
from typing import Any, TextIO

BAR_WIDTH = 24
STEP_INTERVAL_S = 0.5


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


class Sender:
    """The rank-0 end: step events at most every ``STEP_INTERVAL_S``, every epoch's metrics."""

    def __init__(self, queue):
        self.queue = queue
        self.last = 0.0

    def step(self, epoch: int, batch: int, batches: int, loss: float) -> None:
        now = time.monotonic()
        if self.queue is None:
            return
        if now - self.last < STEP_INTERVAL_S and 1 < batch < batches:
            return
        self.last = now
        self.queue.put_nowait(("step", epoch, batch, batches, loss))

    def epoch(self, metrics: dict[str, Any]) -> None:
        if self.queue is not None:
            self.queue.put_nowait(("epoch", metrics))


class Printer:
    """The driver's end: a queue for rank 0 and a thread that prints what arrives."""

    def __init__(self, epochs: int, stream: TextIO | None = None, bar: bool | None = None):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.epochs = epochs
        self.stream = stream or sys.stdout
        self.bar = self.stream.isatty() if bar is None else bar
        self.epoch_started: float | None = None  # at the epoch's first batch
        self.bar_shown = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="steelseg-progress", daemon=True)

    def __enter__(self) -> "Printer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self._clear_bar()
        self.queue.shutdown()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                event = self.queue.get(timeout=0.5)
            except Empty:
                if self.stop.is_set():
                    return
                continue
            except Exception:  # the queue actor is gone (Ray shutting down)
                return
            self.show(event)

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
