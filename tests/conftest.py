import json
import logging
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from steelseg.data import rle, synth

DATA = Path(__file__).parent / "real"  # three real Severstal images and their masks
# Ray 2.60 clusters started with ``ray start`` use token authentication: a driver attaching to
# one by address needs token mode set before Ray reads its config (the token is in
# ~/.ray/auth_token, written by the first ``ray start``).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# The S3-compatible test store takes any credentials; they must be in the environment before the
# Ray nodes start, as on a cluster whose nodes have a role or keys. No instance metadata lookups.
# Checksums only where S3 requires them: the SDK's default (a CRC on every upload, sent as
# aws-chunked) costs the test store, a Python server on the same 2 cores, half its CPU time.
os.environ.update(
    AWS_ACCESS_KEY_ID="steelseg-test", AWS_SECRET_ACCESS_KEY="steelseg-test",
    AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
    AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
)  # fmt: skip


class S3Store:
    """An S3-compatible server on 127.0.0.1 (moto's ``moto_server``, a child process of the
    session, ended by its process tree), with one bucket."""

    bucket = "steelseg"

    def __init__(self, log: Path):
        import boto3
        from raynodes import free_port

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = log  # a line per request, as moto_server logs them
        binary = str(Path(sys.executable).with_name("moto_server"))
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                [binary, "-H", "127.0.0.1", "-p", str(self.port)], stdout=out, stderr=out
            )
        self.client = boto3.client("s3", endpoint_url=self.endpoint)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client.create_bucket(Bucket=self.bucket)
                return
            except Exception:  # not listening yet
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    log_tail = log.read_text()[-500:]
                    raise RuntimeError(f"moto_server did not start: {log_tail}") from None
                time.sleep(0.2)

    def uri(self, key: str) -> str:
        """``s3://steelseg/<key>`` with the store's endpoint, as a user passes it."""
        return f"s3://{self.bucket}/{key}?endpoint_override={self.endpoint}"

    def upload(self, folder: Path, prefix: str) -> str:
        """Every file below ``folder`` to ``<prefix>/``; returns the prefix's URI."""
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(folder).as_posix()}"
                self.client.upload_file(str(path), self.bucket, key)
        return self.uri(prefix)

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        )
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        from raynodes import end_trees

        end_trees([self.process.pid])
        self.process.wait()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    store = S3Store(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The three real Severstal images, their labels and train.csv."""
    return DATA


@pytest.fixture
def steelseg_log():
    """steelseg's log messages while the test runs, as 'level: message' lines."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname.lower()}: {record.getMessage()}")

    logger, handler = logging.getLogger("steelseg"), Keep()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic data set (64x320) shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("synth") / "data"
    return synth.write_dataset(out, 60, height=64, width=320, seed=7, processes=2)


@pytest.fixture
def data_copy(synth_dir, tmp_path) -> Path:
    """A private copy of the synthetic data set that a test may break."""
    return Path(shutil.copytree(synth_dir, tmp_path / "data"))


H, W = 32, 160


def pytest_collection_modifyitems(items):
    """Every test that needs the Ray cluster, the shared run or the sweep (which starts a Ray of
    its own), directly or through a fixture, is marked ``ray``, so ``pytest -m "not ray"`` runs
    the rest; and those tests run last, so that the rest run while the shared run and the sweep
    train in the background (``start_the_ray_runs``). A test whose set-up waits for the shared
    run or the sweep has the time limit of that wait (their fixtures' own deadlines), not the
    suite's per-test limit (pyproject.toml)."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if {"cluster", "trained_run", "background_sweep"} & names:
            item.add_marker(pytest.mark.ray)
        if {"trained_run", "background_sweep"} & names:
            item.add_marker(pytest.mark.timeout(1800))
    items.sort(key=lambda item: item.get_closest_marker("ray") is not None)  # stable


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Two Ray nodes of 3 CPUs each (room for a training worker of 2 CPUs and a Ray Data task
    on every node), started with ``ray start`` as a user would, token authentication on; this
    test process is attached to them as a driver."""
    ray = pytest.importorskip("ray")
    from raynodes import LocalCluster

    nodes = LocalCluster(tmp_path_factory.mktemp("ray"), cpus_per_node=3)
    try:
        nodes.start_head()
        nodes.wait_for_head()
        nodes.add_node()
        ray.init(address=nodes.address, log_to_driver=False, logging_level="ERROR")
        nodes.wait_for_nodes(2)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


@pytest.fixture(scope="session")
def easy_dir(tmp_path_factory) -> Path:
    """An easy set in the Severstal layout: bright class-3 bars and dark class-4 blocks on
    grey noise, so that a few dozen steps visibly learn."""
    out = tmp_path_factory.mktemp("easy")
    (out / "train_images").mkdir()
    rng = np.random.default_rng(0)
    rows = ["ImageId,ClassId,EncodedPixels"]
    for i in range(64):
        image = rng.normal(100, 8, (H, W)).clip(0, 255)
        name = f"{i:09x}.jpg"
        if i % 4:
            class_id, value = (3, 200) if i % 2 else (4, 20)
            mask = np.zeros((H, W), np.uint8)
            x0, y0 = rng.integers(0, W - 48), rng.integers(0, H - 16)
            mask[y0 : y0 + 16, x0 : x0 + 48] = 1
            image[mask == 1] = value
            rows.append(f"{name},{class_id},{rle.encode(mask)}")
        rgb = np.repeat(image.astype(np.uint8)[..., None], 3, axis=2)
        Image.fromarray(rgb).save(out / "train_images" / name, quality=95)
    (out / "train.csv").write_text("\n".join(rows) + "\n")
    return out


ODD_H, ODD_W = 48, 176  # sides not divisible by 32: validation and prediction must pad


@pytest.fixture(scope="session")
def four_class_dir(tmp_path_factory) -> Path:
    """An easy set of all four classes at 48x176: dark class-1 squares, bright class-2 vertical
    lines, bright class-3 bars and dark class-4 blocks on grey noise, one defect an image, a
    quarter of the images clean."""
    out = tmp_path_factory.mktemp("four")
    (out / "train_images").mkdir()
    rng = np.random.default_rng(1)
    looks = {1: (12, 12, 30), 2: (40, 4, 230), 3: (16, 48, 200), 4: (24, 40, 20)}
    rows = ["ImageId,ClassId,EncodedPixels"]
    for i in range(96):
        image = rng.normal(110, 8, (ODD_H, ODD_W)).clip(0, 255)
        name = f"{i:09x}.jpg"
        if i % 4:
            class_id = 1 + i % 4 if i % 8 < 4 else 1 + (i + 1) % 4
            height, width, value = looks[class_id]
            mask = np.zeros((ODD_H, ODD_W), np.uint8)
            y0, x0 = rng.integers(0, ODD_H - height), rng.integers(0, ODD_W - width)
            mask[y0 : y0 + height, x0 : x0 + width] = 1
            image[mask == 1] = value
            rows.append(f"{name},{class_id},{rle.encode(mask)}")
        rgb = np.repeat(image.astype(np.uint8)[..., None], 3, axis=2)
        Image.fromarray(rgb).save(out / "train_images" / name, quality=95)
    (out / "train.csv").write_text("\n".join(rows) + "\n")
    return out


@pytest.fixture(scope="session")
def four_class_uri(s3, four_class_dir) -> str:
    """The four-class set in the test bucket, as a user keeps a data set."""
    return s3.upload(four_class_dir, "data/four")


def small_run(data: Path | str, storage: Path | str, **changes):
    """A small, fast run: 2 workers spread over the 2 nodes, crops of 32x160."""
    from steelseg.config import TrainConfig

    values = dict(
        data=str(data), storage=str(storage), name="run", epochs=2, batch_size=4,
        num_workers=2, placement_strategy="SPREAD", lr=3e-3, warmup_steps=4, log_images=2,
        val_fraction=0.25, crop_height=32, crop_width=160, seed=1, max_failures=2,
    )  # fmt: skip
    return TrainConfig(**{**values, **changes})


def train_flags(config) -> list[str]:
    """A config's values as the train job's flags."""
    flags = []
    for key in ("data", "storage", "name", "epochs", "batch_size", "num_workers",
                "cpus_per_worker", "placement_strategy", "lr", "warmup_steps", "log_images",
                "val_fraction", "crop_height", "crop_width", "seed", "max_failures",
                "keep_checkpoints"):  # fmt: skip
        flags += ["--" + key.replace("_", "-"), str(getattr(config, key))]
    if config.min_workers:  # elastic: --num-workers MIN..MAX
        flags[flags.index("--num-workers") + 1] = f"{config.min_workers}..{config.num_workers}"
    return flags


def wait_for_checkpoint(run_dir, epoch: int, timeout_s: float = 300):
    """The run's history once Ray has registered the checkpoint of ``epoch`` (before that, a
    restart would not find it)."""
    from steelseg.runs import read_history

    registered = run_dir / "checkpoint_manager_snapshot.json"  # Ray Train's list of them
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            saved = registered.is_file() and f"epoch_{epoch:04d}" in registered.read_text()
            history = read_history(run_dir) if saved else []
        except ValueError:  # a file being written
            history = []
        if len(history) and history["epoch"].iloc[-1] == epoch:
            return history
        time.sleep(1.0)  # each look is three requests to the store, which shares the 2 cores
    raise AssertionError(f"no checkpoint of epoch {epoch} in {run_dir} after {timeout_s} s")


@contextmanager
def in_thread(function, *args):
    """``function(*args)`` in a thread of its own: a Future of its result, waited for on exit."""
    pool = ThreadPoolExecutor(1)
    try:
        yield pool.submit(function, *args)
    finally:
        pool.shutdown(wait=True)


@pytest.fixture(scope="session")
def background_sweep(easy_dir, s3, tmp_path_factory):
    """sweeprun.run_sweep in a thread of its own: a Future of its result. Started with the
    session's first test (start_the_ray_runs), before the shared run when that is selected too,
    so that the two run side by side (80 s less than one after the other when measured: 412 s
    against 491); waited for at the session's end, when its Ray and processes have ended."""
    from sweeprun import run_sweep

    space = tmp_path_factory.mktemp("space") / "space.yaml"
    with in_thread(run_sweep, easy_dir, s3.uri("sweeps"), space) as future:
        yield future


@dataclass
class TrainedRun:
    run_dir: Any  # a Location in the bucket
    before: Any  # the history when the first job was stopped
    ended_node: list  # the pids of the node ended during the third job
    submitted: dict  # job id -> (ray job status, ray job logs) of the submitted jobs
    calibration: dict  # the report stored with the best checkpoint when the run ended


STOPPED, RESUMED = "steelseg-test-stopped", "steelseg-test-resumed"


def train_shared_run(cluster, s3, four_class_uri: str) -> TrainedRun:
    """The run the training, prediction and figure tests share, on the four-class set, data and
    run in the test bucket, 2 workers on the 2 nodes:
    1. the train job submitted with `ray job submit` for 3 epochs, elastic
       (`--num-workers 1..2`), 2 checkpoints kept, and stopped with `ray job stop` once epoch 1
       is saved;
    2. the same submission again: it resumes from epoch 1; once epoch 2 is saved the second
       node is ended (its process tree), and the run goes on with 1 worker from that checkpoint
       and finishes. A new second node is then started for the tests that follow."""
    from raynodes import descendants

    from steelseg.runs import best_checkpoint, read_calibration, read_history

    storage = s3.uri("runs")  # the run lives wholly in the bucket
    run_dir = small_run(four_class_uri, storage).run_dir
    # elastic, 2 CPUs a worker: a node left alone holds one worker and still has a CPU for Ray
    # Data (elastic training would otherwise fill it with workers and leave the data none)
    elastic = small_run(
        four_class_uri, storage, epochs=3, min_workers=1, cpus_per_worker=2.0, keep_checkpoints=2
    )
    entrypoint = ["python", "-m", "ray_jobs.train", *train_flags(elastic)]
    # one torch thread a worker, as in the other runs: the two nodes share this machine's 2
    # cores; and Ray Train's wait for the placement group of a worker group cut from 60 s to
    # 10 s: when a worker fails as its node is ended, Ray has not yet seen the node gone (3 s),
    # so Train first asks for 2 workers again and waits this long before it plans with 1 (a
    # wait that times out is retried, never a failure of the run)
    env_vars = {"OMP_NUM_THREADS": "1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
    submit = ["submit", "--working-dir", ".", "--no-wait",
              "--runtime-env-json", json.dumps({"env_vars": env_vars})]  # fmt: skip
    started = cluster.job(*submit, "--submission-id", STOPPED, "--", *entrypoint)
    assert started.returncode == 0, started.stderr[-3000:]
    wait_for_checkpoint(run_dir, 1)
    stopped = cluster.job("stop", STOPPED)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    before = read_history(run_dir)

    again = cluster.job(*submit, "--submission-id", RESUMED, "--", *entrypoint)
    assert again.returncode == 0, again.stderr[-3000:]
    wait_for_checkpoint(run_dir, 2)
    second = cluster.nodes[1]
    ended_node = descendants(second.process.pid)
    second.end()
    try:
        cluster.wait_for_job(RESUMED)
        submitted = {
            job_id: (cluster.job_status(job_id), cluster.job("logs", job_id).stdout)
            for job_id in (STOPPED, RESUMED)
        }
        status, logs = submitted[RESUMED]
        assert status == "SUCCEEDED", f"the resumed job {status}: {logs[-3000:]}"
        calibration = read_calibration(best_checkpoint(run_dir))  # before a test calibrates again
    finally:  # a new second node for the tests that follow, whatever happened to the run
        cluster.wait_for_nodes(1, exactly=True)
        cluster.add_node()
        cluster.wait_for_nodes(2)
    return TrainedRun(run_dir, before, ended_node, submitted, calibration)


@pytest.fixture(scope="session")
def background_run(cluster, s3, four_class_uri):
    """train_shared_run in a thread of its own: a Future of its TrainedRun (the test cluster
    is started first, in the test process's main thread: the test process attaches to it);
    waited for at the session's end."""
    with in_thread(train_shared_run, cluster, s3, four_class_uri) as future:
        yield future


@pytest.fixture(scope="session")
def trained_run(background_run) -> TrainedRun:
    """The shared run (train_shared_run), once it has finished."""
    return background_run.result(timeout=1800)


@pytest.fixture(scope="session", autouse=True)
def start_the_ray_runs(request):
    """The sweep and the shared run, each when tests that use it are selected, start with the
    session's first test, the sweep first: the tests without Ray, which run first, run beside
    them."""
    wanted = {name for item in request.session.items for name in item.fixturenames}
    if "sweep_run" in wanted:
        request.getfixturevalue("background_sweep")
    if "trained_run" in wanted:
        request.getfixturevalue("background_run")
