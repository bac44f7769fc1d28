"""The worker loop's parts that run without a Ray Train worker."""

import time

import pytest

from steelseg.training.loop import Waited


def test_waited_adds_up_the_time_spent_waiting_for_each_batch_only():
    def slow_batches():
        for i in range(3):
            time.sleep(0.05)  # the pipeline producing a batch
            yield {"i": i}

    batches = Waited(slow_batches())
    seen = []
    for batch in batches:
        time.sleep(0.1)  # the step: not waiting
        seen.append(batch["i"])
    assert seen == [0, 1, 2]
    assert batches.seconds == pytest.approx(0.15, abs=0.04)
