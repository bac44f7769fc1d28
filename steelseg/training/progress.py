"""Training progress from rank 0 to the driver: rank 0 sends events through a Ray queue (an
actor that takes no CPU) that the driver drains in a thread and hands to a callback, so progress
reaches the front end wherever the driver's output goes (a terminal, ``ray job logs``) while the
workers' own output stays off the driver's console.

Events: ``("step", epoch, batch, batches, loss)`` and ``("epoch", metrics)``.
"""

import threading
import time
from collections.abc import Callable
from typing import Any

STEP_INTERVAL_S = 0.5


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


class Relay:
    """The driver's end: a queue for rank 0 and a thread that passes each event to
    ``on_event``."""

    def __init__(self, on_event: Callable[[tuple], None]):
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.on_event = on_event
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="steelseg-progress", daemon=True)

    def __enter__(self) -> "Relay":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
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
            self.on_event(event)
