"""Training progress from rank 0 to the driver: rank 0 sends events through a Ray queue (an
actor that takes no CPU) that the driver drains in a thread and hands to a callback, so progress
reaches the front end wherever the driver's output goes (a terminal, ``ray job logs``) while the
workers' own output stays off the driver's console.

Events: ``("step", epoch, batch, batches, loss)`` and ``("epoch", metrics)``.
"""

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

STEP_INTERVAL_S = 0.5


class Sender:
    """The rank-0 end: step events at most every ``STEP_INTERVAL_S``, every epoch's metrics."""

    def __init__(self, queue):
        self.queue = queue
        self.last = 0.0

    def step(self, epoch: int, batch: int, batches: int, loss) -> None:
        """``loss``: a float or a 0-d tensor, read only when an event is sent (on a GPU, reading
        it waits for the step)."""
        now = time.monotonic()
        if self.queue is None:
            return
        if now - self.last < STEP_INTERVAL_S and 1 < batch < batches:
            return
        self.last = now
        self._send(("step", epoch, batch, batches, float(loss)))

    def epoch(self, metrics: dict[str, Any]) -> None:
        if self.queue is not None:
            self._send(("epoch", metrics))

    def _send(self, event: tuple) -> None:
        """Best effort: progress lines are not worth a training run (a driver that is gone
        takes its queue with it)."""
        try:
            self.queue.put_nowait(event)
        except Exception as e:  # the queue actor died, or is full
            log.warning("progress not sent to the driver (%s); training goes on", type(e).__name__)
            self.queue = None


class Relay:
    """The driver's end: a queue for rank 0 and a thread that passes each event to
    ``on_event``."""

    def __init__(self, on_event: Callable[[tuple], None]):
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node: a queue on a worker node would die with that node, and with
        # it the driver's run (an elastic run must outlive any node but the driver's)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
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
