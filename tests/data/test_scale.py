"""The checks of a data set grow linearly with it: the requests to the store that ``steelseg
validate`` (``catalog.scan``), a train run's first start (a full check, recorded) and a later
run's start (no image read: it trusts the record) make for N and 4N images in a bucket.

Linear work, a + b x N requests, grows at most 4x from N to 4N; a request per pair of images
grows 16x. A listing per image (an existence check by listing the folder, say) costs quadratic
time in a folder of 12,568 images, a listing being as long as the folder, while its requests
grow only 4x at these sizes: so the listings are counted apart, and must not grow at all (one
page of up to 1,000 names each here). Checked by making ``catalog.list_images`` run once per
image in ``scan``: the listings grow 4x and the test fails.
"""

import time
import uuid

import pytest

from steelseg.config import TrainConfig
from steelseg.data import catalog, synth

N = 6


def requests(log, offset: int, prefix: str) -> tuple[int, int]:
    """(listings, other requests) naming ``prefix`` in the store's log after byte ``offset``,
    once the log has stopped growing (the server logs a request after answering it)."""
    size, deadline = -1, time.monotonic() + 5
    while log.stat().st_size != size and time.monotonic() < deadline:
        size = log.stat().st_size
        time.sleep(0.3)
    with open(log, "rb") as f:
        f.seek(offset)
        lines = [line for line in f.read().decode().splitlines() if prefix in line]
    listings = sum(1 for line in lines if "list-type=" in line)
    return listings, len(lines) - listings


def counted(s3, prefix: str, work) -> tuple[int, int]:
    offset = s3.log.stat().st_size
    work()
    return requests(s3.log, offset, prefix)


@pytest.fixture(scope="module")
def data_sets(s3, tmp_path_factory):
    """The prefix of this module's objects and the URIs of a set of N and of 4N tiny images."""
    prefix = f"scale-{uuid.uuid4().hex[:8]}"
    folder = tmp_path_factory.mktemp("scale")
    uris = {}
    for n in (N, 4 * N):
        data = synth.write_dataset(folder / f"n{n}", n, height=32, width=160, seed=3, processes=1)
        uris[n] = s3.upload(data, f"{prefix}/n{n}")
    return prefix, uris


def test_the_requests_of_a_data_check_grow_at_most_linearly(s3, data_sets):
    from steelseg.training.fit import load_split  # no Ray: the images are read here

    prefix, uris = data_sets
    found = {}
    for n, uri in uris.items():
        config = TrainConfig(
            data=uri, storage=s3.uri(f"{prefix}/runs"), num_workers=1, val_fraction=0.25
        )
        start = config.replace(name=f"first-{n}")
        later = config.replace(name=f"later-{n}")
        found[n] = {
            "validate": counted(s3, prefix, lambda uri=uri: catalog.scan(uri)),
            "first start": counted(
                s3, prefix, lambda c=start: load_split(c, inspect=catalog.inspect_many)
            ),
            "later start": counted(
                s3, prefix, lambda c=later: load_split(c, inspect=catalog.inspect_many)
            ),
        }
    for phase, (listings, others) in found[N].items():
        more_listings, more_others = found[4 * N][phase]
        assert more_listings == listings, f"{phase}: listings {listings} -> {more_listings}"
        message = f"{phase}: requests {others} -> {more_others}"
        if phase == "later start":  # the data check's record answers: no image is read
            assert more_others == others, message
        else:
            assert 4 * N <= more_others <= 4 * others, message
