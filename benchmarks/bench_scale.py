"""Every stage at the real data's size (12,568 images of 256x1600): ``steelseg synth``,
``validate`` (local and in a bucket), ``train`` from start to its first optimizer step (local and
bucket, on a data set never checked and on one checked once), a resume, a 2-trial Tune sweep, one
epoch of the training data pipeline, ``evaluate``, ``figures`` and ``predict``; each at 1,000,
4,000 and 12,568 images, with wall time, memory and the object store, and the issue's targets.

    python benchmarks/bench_scale.py                 # the real sizes: ~1.2 h on 2 cores (below)
    python benchmarks/bench_scale.py --stages train,resume --sizes 1000,12568   # again, merged
    python benchmarks/bench_scale.py --failed             # the stages whose rows have an error
    python benchmarks/bench_scale.py --sizes 40,160 --height 64 --width 320 --crop 64x160 \
        --val-images 4 --predict-images 16 --test-images 80 --json /tmp/scale_smoke.json

The data set is made once with ``steelseg synth`` (the largest size needed, seed 0) and kept in
``--cache`` with the time it took (``synth-times.json``: a rerun reports it without making it
again; the synth rows of smaller N are timed once each in a scratch folder); each smaller N is a
folder of hard links to the set's first N images with ``train.csv`` cut to them (the catalog
lists a folder, so a subset is a folder of its own). The bucket stages read an S3-compatible
store started here (``moto_server``, the tests' ``S3Store``); each N is uploaded to it once a
run (``upload_s`` in the JSON, not a stage). Runs go to a new folder each time
(``work-<date>/runs`` in the cache, deleted at the end unless ``--keep-runs``; the logs stay),
so a first train always meets a data set never checked. The JSON is written after every stage;
a rerun replaces the rows of the stages and sizes it measures and keeps the others
(``--fresh``: none). A stage that fails is a row with its ``error`` (the line of its output
that says why, and its log); the others still run, and ``--failed`` runs those rows again.

Each stage runs as a user runs it, ``python -m steelseg ...`` in a process of its own (the
pipeline: this script, ``--pipeline-epoch``), with a Ray temp folder of its own (``RAY_TMPDIR``:
a new local Ray), and its process tree is sampled every 0.25 s from /proc. The columns:

- ``seconds``: the command's wall time, imports included (pipeline: the epoch's).
- ``first_step_s``: train runs on a pseudo-terminal, so its progress bar is drawn as in a
  user's terminal; the seconds until the bar first shows batch 1, which rank 0 sends after the
  first optimizer step. ``ray_up_s``: until it prints "started a local Ray" (local data: after
  the catalog, the data check and the split; bucket data: before them, the check then runs in
  Ray tasks). A train run takes 2 steps of ``--batch`` crops of ``--crop``, then validates
  ``--val-images`` whole images (the same number at every N), checkpoints and calibrates.
- ``driver_mb``: peak RSS (VmHWM) of the command's process. ``workers_mb``: the peak of the
  summed RSS of its descendants (Ray's gcs_server, raylet, agents and workers; the pages of
  shared libraries count once per process); the JSON also has the largest one (``largest_mb``).
- ``store_mb``: the object store's resident size, the allocated blocks of the raylet's plasma
  file in /dev/shm (sampled every 0.05 s: a run may write its last objects just before Ray
  ends); pages once written stay allocated, so it is the peak. ``spilled_mb`` (JSON): the peak
  size of the session's ``ray_spilled_objects*`` folders.
- ``read_mb``: bytes the tree read with read() (``rchar``: page-cache hits, and each Python
  process's imports, some 50-300 MB). ``requests``: requests to the store naming the data set
  (moto's log). ``full_checks``: ``data_check.json`` files written during the stage, i.e. data
  checks that decoded every image (a run's first start writes the run's and the storage's: 2);
  0: no image was decoded (a checked data set's record is trusted).
- pipeline: ``after_first_per_s`` is images/s per CPU after the epoch's first batch (the steady
  rate; ``images_per_s`` includes the start, ``first_batch_s``). grey: the visible images read
  as one channel, as train reads a grey data set; rgb: as three, as before that lever.
- predict: ``read_s``, ``forward_s``, ``encode_s``: the summed wall time of Ray Data's tasks of
  each stage, from its stats (printed by a 10-line wrapper around ``steelseg.cli.main``).

How to read the results: the last table lists the issue's targets, MET or MISSED, with the
figures: each stage's time at the largest N against the smallest (12,568 against 1,000: at most
13x), train's first step once the data set is checked (60 s local, 120 s bucket), validate
(180 s), the driver's RSS (2 GB), the object store (at most 2x from the smallest N to the
largest, nothing spilled), resume and sweep decoding nothing (``full_checks`` 0), and the
pipeline's rate per CPU (as high at 12,568 as at 1,000, at least 150). A train ``first`` row
decodes the whole data set; ``checked`` is the same command under another name on the same
storage (no image read); ``resume`` reruns ``checked`` with ``--epochs 2 --max-steps 4``; the
sweep (2 trials of 1 step) runs after them, on the same storage. The page cache is warm for
every stage but synth. Each command's output is in ``work-<date>/logs/`` in the cache.

Time on this 2-core machine (measured on a 2-core Xeon with AMX): synth ~7 min on the first
run only (12,568 images at ~47/s, and 1,000 and 4,000 timed apart); train, train-bucket, resume
and sweep ~9 min per N, mostly fixed costs (Ray and Train start, validation, calibration);
validate, the uploads, the pipeline, evaluate and figures ~12 min together; predict ~11 min
(0.75 images/s in bf16 with one actor; ~3x longer without bf16): about 1.2 h, 1.1 h once the
data set is cached. Trim with ``--stages``
(without ``synth``: the smaller sets are not timed; evaluate and figures apart, at fewer
``--sizes``), ``--test-images`` and ``--predict-images``.
"""

import argparse
import codecs
import contextlib
import itertools
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from common import RESULTS, record, table

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "tests"))  # raynodes: process trees; conftest: the test store

from raynodes import alive, end_trees  # noqa: E402

STAGES = (
    "synth", "validate", "validate-bucket", "train", "train-bucket", "resume", "sweep",
    "pipeline", "evaluate", "figures", "predict",
)  # fmt: skip
ANY_SIZE = {"evaluate", "figures"}  # also run at --test-images
SAMPLE_S, STORE_SAMPLE_S = 0.25, 0.05
# the bound for 12,568 images against 1,000 (13x), for any pair of sizes
LINEAR_SLACK = 13 / 12.568
FIRST_STEP_LOCAL_S, FIRST_STEP_BUCKET_S, VALIDATE_S = 60.0, 120.0, 180.0
DRIVER_MB, PIPELINE_PER_CPU = 2048.0, 150.0
STORE_GROWTH = 2.0  # the object store's peak at N_max against N_min; the data grows 12.6x
# what the commands print that is timed: the progress bar's first batch, Ray's start
MARKS = {
    "first_step_s": re.compile(r"\] 1/\d+ loss"),
    "ray_up_s": re.compile(r"started a local Ray"),
}
REQUEST = re.compile(r"(?:GET|PUT|HEAD|POST|DELETE) /\S* HTTP/")  # moto colours some lines
# predict with Ray Data's stats of every operator printed at the end (Ray prints the last one's)
PREDICT_WITH_STATS = """\
import functools, logging, sys
import ray.data
from ray.data._internal.stats import DatasetStatsSummary
ray.data.DataContext.get_current().enable_auto_log_stats = True
logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.INFO)
summary = DatasetStatsSummary.to_string
DatasetStatsSummary.to_string = functools.wraps(summary)(
    lambda self, *a, **k: summary(self, *a, **{**k, "include_parent": True}))
from steelseg.cli import main
sys.exit(main(sys.argv[1:]))
"""
# an operator's summed task wall time in Ray Data's stats: "Operator 2 MapBatches(Predictor): ...
# * Remote wall time: 1.2s min, 1.5s max, 1.3s mean, 80.4s total"
OPERATOR = re.compile(
    r"Operator \d+ MapBatches\((\w+)\).*?Remote wall time: .*? ([\d.]+)(us|ms|s) total", re.S
)
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
PREDICT_STAGES = {"read_images": "read_s", "Predictor": "forward_s", "encode_masks": "encode_s"}
COLUMNS = [
    "stage", "variant", "n", "seconds", "images_per_s", "first_step_s", "ray_up_s",
    "driver_mb", "workers_mb", "store_mb", "read_mb", "requests", "full_checks", "error",
]  # fmt: skip
# printed with a stage's own rows too (all are in the JSON)
STAGE_COLUMNS = {
    "pipeline": ["after_first_per_s", "first_batch_s", "wall_s"],
    "predict": ["read_s", "forward_s", "encode_s"],
    "synth": ["cached"],
}


class StageError(Exception):
    """A stage's command failed: its exit status and the end of its output."""


EXCEPTION = re.compile(r"[\w.]+(?:Error|Exception): ")


def last_error(output: str) -> str:
    """The line of a command's output that says what went wrong: its last error line (steelseg's
    own, or an exception's), else its last line."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", output)  # colours
    lines = [" ".join(line.split()) for line in re.split(r"[\r\n]", plain) if line.strip()]
    ours = [line for line in lines if line.startswith("steelseg: error")]
    raised = [line for line in lines if EXCEPTION.match(line)]
    return ((ours or raised or lines or [""])[-1])[:300]


# --- a process tree, sampled -------------------------------------------------------------------


def process_table() -> dict[int, tuple[int, int, float]]:
    """pid -> (parent pid, start time in ticks, CPU seconds) of every process, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        found[int(entry)] = (int(fields[1]), int(fields[19]), cpu)
    return found


def tree(root: int, processes: dict[int, tuple[int, int, float]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    pids = [root]
    for pid in pids:
        pids += children.get(pid, [])
    return pids


def proc_fields(pid: int, name: str, keys: tuple[str, ...]) -> dict[str, int]:
    """``key: value`` lines of /proc/<pid>/<name> (status: kB), as ints."""
    found = {}
    for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in keys:
            found[key] = int(value.split()[0])
    return found


class Watcher:
    """Samples a process tree in a thread: each process's peak RSS, reads and CPU time, the
    summed RSS of the descendants, and Ray's object store (the raylet's plasma file) and spill
    folders below ``ray_tmp``."""

    def __init__(self, root: int, ray_tmp: Path):
        self.root, self.ray_tmp = root, ray_tmp
        self.seen: dict[int, int] = {}  # pid -> start time, to tell a reused pid
        self.hwm_kb: dict[int, int] = {}
        self.rchar: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self.workers_kb = 0
        self.raylets: set[int] = set()  # the object store lives in the raylet
        self.store_bytes = self.spilled_bytes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="watcher", daemon=True)

    def __enter__(self) -> "Watcher":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        """The object store every STORE_SAMPLE_S (a run's last objects may be written just
        before Ray ends), the rest every SAMPLE_S, the spill folders every 4 x SAMPLE_S."""
        count, every = 0, round(SAMPLE_S / STORE_SAMPLE_S)
        while True:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if count % every == 0:
                    self.sample(spill=count % (4 * every) == 0)
                self.sample_store()
            count += 1
            if self.stop.wait(STORE_SAMPLE_S):
                return

    def sample(self, spill: bool) -> None:
        processes = process_table()
        summed = 0
        for pid in tree(self.root, processes):
            if pid not in processes:  # the root, ended
                continue
            started = processes[pid][1]
            if self.seen.setdefault(pid, started) != started:
                continue  # a pid reused since: not the process first seen
            try:
                memory = proc_fields(pid, "status", ("VmRSS", "VmHWM"))
                reads = proc_fields(pid, "io", ("rchar",))
                if pid != self.root and pid not in self.raylets and is_raylet(pid):
                    self.raylets.add(pid)
            except OSError:  # ended meanwhile
                continue
            self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), memory.get("VmHWM", 0))
            self.rchar[pid] = max(self.rchar.get(pid, 0), reads.get("rchar", 0))
            self.cpu[pid] = processes[pid][2]
            if pid != self.root:
                summed += memory.get("VmRSS", 0)
        self.workers_kb = max(self.workers_kb, summed)
        if spill:
            self.spilled_bytes = max(self.spilled_bytes, spilled(self.ray_tmp))

    def sample_store(self) -> None:
        for pid in self.raylets:
            with contextlib.suppress(OSError):
                self.store_bytes = max(self.store_bytes, plasma_bytes(pid))

    def usage(self) -> dict:
        mb = 1 / 1024
        workers = [kb for pid, kb in self.hwm_kb.items() if pid != self.root]
        return {
            "driver_mb": round(self.hwm_kb.get(self.root, 0) * mb),
            "workers_mb": round(self.workers_kb * mb),
            "largest_mb": round(max(workers, default=0) * mb),
            "store_mb": round(self.store_bytes / 2**20, 1) if self.raylets else None,
            "spilled_mb": round(self.spilled_bytes / 2**20, 1) if self.raylets else None,
            "read_mb": round(sum(self.rchar.values()) / 2**20),
            "cpu_s": round(sum(self.cpu.values()), 1),
            "processes": len(self.seen),
        }


def is_raylet(pid: int) -> bool:
    """Read each time it is asked: a process just forked still has its parent's name."""
    return Path(f"/proc/{pid}/comm").read_text().strip() == "raylet"


def plasma_bytes(pid: int) -> int:
    """The allocated bytes of the plasma file the raylet ``pid`` maps (the object store's
    pages written so far: they stay allocated), 0 before it maps one. Found through the mapping,
    which outlives the file's descriptor."""
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        if "/plasma" in line:
            return os.stat(f"/proc/{pid}/map_files/{line.split()[0]}").st_blocks * 512
    return 0


def spilled(ray_tmp: Path) -> int:
    """Bytes in the Ray sessions' spill folders below ``ray_tmp``."""
    total = 0
    for folder in ray_tmp.glob("ray/session_*/ray_spilled_objects*"):
        for path in folder.rglob("*"):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
    return total


def end_left_over(seen: dict[int, int], root: int) -> list[int]:
    """End the processes of a tree that outlived its root (still the ones first seen: same
    start time); returns their pids."""
    processes = process_table()
    left = [
        pid
        for pid, started in seen.items()
        if pid != root and processes.get(pid, (0, -1))[1] == started and alive(pid)
    ]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(alive(p) for p in left):
            time.sleep(0.1)
    return left


# --- running a command --------------------------------------------------------------------------


@dataclass
class Ran:
    seconds: float
    returncode: int
    marks: dict[str, float]
    usage: dict
    tail: str
    log: Path


class Output:
    """A command's output read in a thread: written to ``log``, the first time each of
    ``MARKS`` appears noted (seconds from ``start``), the last 4 kB kept."""

    def __init__(self, fd: int, log: Path, start: float):
        self.fd, self.log, self.start = fd, log, start
        self.marks: dict[str, float] = {}
        self.tail = ""
        self.thread = threading.Thread(target=self._read, name="output", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        pending, decoder = "", codecs.getincrementaldecoder("utf-8")("replace")
        with open(self.log, "ab") as out:
            while True:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:  # a pseudo-terminal whose other end closed
                    return
                if not chunk:
                    return
                out.write(chunk)
                out.flush()
                text = decoder.decode(chunk)
                self.tail = (self.tail + text)[-4096:]
                *segments, pending = re.split(r"[\r\n]", pending + text)
                for segment in segments:
                    self._note(segment)

    def _note(self, segment: str) -> None:
        for name, pattern in MARKS.items():
            if name not in self.marks and pattern.search(segment):
                self.marks[name] = round(time.monotonic() - self.start, 2)


def run_command(
    argv: list[str], env: dict, log: Path, ray_tmp: Path, *, tty: bool, timeout_s: float
) -> Ran:
    """Run ``argv``, its output to ``log`` (on a pseudo-terminal with ``tty``), sampling its
    process tree; whatever of the tree is left when it ends (or times out) is ended."""
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(" ".join(argv) + "\n\n")
    reader, writer = pty.openpty() if tty else os.pipe()
    start = time.monotonic()
    process = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=writer, stderr=writer, cwd=REPO
    )
    os.close(writer)
    output = Output(reader, log, start)
    watcher = Watcher(process.pid, ray_tmp)
    returncode = None
    try:
        with watcher:
            try:
                returncode = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                end_trees([process.pid])
                process.wait()
    finally:
        if returncode is None and process.poll() is None:  # interrupted
            end_trees([process.pid])
            process.wait()
        seconds = time.monotonic() - start
        left = end_left_over(watcher.seen, process.pid)
        output.thread.join(timeout=10)
        os.close(reader)
    if left:
        print(f"  ended {len(left)} process(es) left by the command: {left}")
    if returncode is None:
        raise StageError(f"timed out after {timeout_s:.0f} s: {output.tail[-600:]}")
    return Ran(seconds, returncode, output.marks, watcher.usage(), output.tail, log)


def command_env(ray_tmp: Path) -> dict[str, str]:
    """This environment, with the checkout importable, a Ray temp folder of the command's own (a
    new local Ray, never a cluster another user started) and the test store's credentials."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0",
        AWS_ACCESS_KEY_ID="steelseg-test", AWS_SECRET_ACCESS_KEY="steelseg-test",
        AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
        AWS_REQUEST_CHECKSUM_CALCULATION="when_required",
    )  # fmt: skip
    return env


# --- the data sets ------------------------------------------------------------------------------


def image_names(n: int) -> list[str]:
    """The first ``n`` images of ``steelseg synth``'s set (seed 0)."""
    from steelseg.data.synth import image_id

    return [image_id(0, i) for i in range(n)]


def make_subset(full: Path, n: int, folder: Path) -> Path:
    """``folder``: hard links to the first ``n`` images of ``full`` and their train.csv rows."""
    images = folder / "train_images"
    if (folder / "train.csv").is_file() and len(os.listdir(images)) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    building = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(building, ignore_errors=True)
    (building / "train_images").mkdir(parents=True)
    names = image_names(n)
    for name in names:
        source, link = full / "train_images" / name, building / "train_images" / name
        try:
            os.link(source, link)
        except OSError:  # another filesystem
            link.symlink_to(source)
    wanted = set(names)
    header, *rows = (full / "train.csv").read_text().splitlines()
    kept = [row for row in rows if row.split(",", 1)[0] in wanted]
    (building / "train.csv").write_text("\n".join([header, *kept]) + "\n")
    building.rename(folder)
    return folder


def data_mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in (folder / "train_images").iterdir()) / 2**20, 1)


def write_submission(truth: Path, names: list[str], out: Path) -> Path:
    """A submission of every image of ``names``: the true masks, every 5th left out and every
    7th image's first mask repeated as the next class (errors of both kinds, of real sizes)."""
    masks: dict[str, dict[int, str]] = {}
    for row in truth.read_text().splitlines()[1:]:
        image, class_id, encoded = row.split(",")
        masks.setdefault(image, {})[int(class_id)] = encoded
    lines, count = ["ImageId,EncodedPixels,ClassId"], 0
    for i, name in enumerate(names):
        predicted = dict(masks.get(name, {}))
        for class_id in list(predicted):
            count += 1
            if count % 5 == 0:
                del predicted[class_id]
        if i % 7 == 0 and masks.get(name):
            first = min(masks[name])
            predicted.setdefault(first % 4 + 1, masks[name][first])
        lines += [f"{name},{predicted.get(c, '')},{c}" for c in (1, 2, 3, 4)]
    out.write_text("\n".join(lines) + "\n")
    return out


# --- the benchmark ------------------------------------------------------------------------------


@dataclass
class Settings:
    sizes: list[int]
    height: int
    width: int
    crop: tuple[int, int]
    stages: list[str]
    predict_images: int
    test_images: int
    val_images: int
    batch: int
    cache: Path
    json: str
    timeout_s: float
    keep_runs: bool
    fresh: bool
    failed: bool


@dataclass
class Bench:
    settings: Settings
    rows: list[dict] = field(default_factory=list)
    upload_s: dict[int, float] = field(default_factory=dict)
    store: object = None  # the tests' S3Store, started for the first bucket stage

    def __post_init__(self):
        self.cache = self.settings.cache
        self.work = self.cache / f"work-{time.strftime('%Y%m%d-%H%M%S')}"
        self.logs, self.runs = self.work / "logs", self.work / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.full: Path | None = None
        self.made: dict[int, dict] = {}  # synth rows timed in this run, by N
        self.sizes = sorted(set(self.settings.sizes))  # and those of the rows kept from before
        self.bucket_runs = f"runs-{self.work.name}"

    # --- plan --------------------------------------------------------------------------------

    def plan(self) -> list[tuple[str, int]]:
        """(stage, N) in the order run: synth, then each N's stages, predict last."""
        s = self.settings
        wanted = [stage for stage in STAGES if stage in s.stages]
        sizes = sorted(set(s.sizes))
        steps = [("synth", n) for n in sizes if "synth" in wanted]
        extra = {s.test_images} if ANY_SIZE & set(wanted) else set()
        for n in sorted(set(sizes) | extra):
            steps += [
                (stage, n)
                for stage in wanted
                if stage not in ("synth", "predict") and (n in sizes or stage in ANY_SIZE)
            ]
        if "predict" in wanted:
            steps.append(("predict", s.predict_images))
        return steps

    def run(self) -> None:
        earlier = self.earlier_rows()
        steps = self.plan()
        if self.settings.failed:
            failed = {(r["stage"], r["n"]) for r in earlier if r.get("error")}
            steps = [step for step in steps if step in failed]
            if not steps:
                print("no failed stage to run again")
                return
        self.rows = [r for r in earlier if (r["stage"], r["n"]) not in set(steps)]
        if self.rows:
            print(f"kept {len(self.rows)} rows of {self.settings.json} not run again")
        needed = max(n for _, n in steps)
        print(f"{len(steps)} stage runs; cache {self.cache}; output of each in {self.logs}")
        try:
            self.full = self.full_set(needed)
            for stage, n in steps:
                self.measure(stage, n)
        finally:
            if self.store is not None:
                self.store.stop()
            if not self.settings.keep_runs:
                shutil.rmtree(self.runs, ignore_errors=True)
            self.save()
        self.report()

    def earlier_rows(self) -> list[dict]:
        """The rows already in ``--json`` (of the same image size and crop), their sizes kept
        for the targets."""
        s = self.settings
        path = Path(s.json)
        path = RESULTS / path if path.parent == Path(".") else path
        if s.fresh or not path.is_file():
            return []
        earlier = json.loads(path.read_text())
        if (earlier.get("size"), earlier.get("crop")) != (
            f"{s.height}x{s.width}",
            f"{s.crop[0]}x{s.crop[1]}",
        ):
            print(f"{path.name} holds rows of another image size or crop: replaced")
            return []
        self.sizes = sorted(set(self.sizes) | set(earlier.get("sizes", [])))
        return earlier["rows"]

    def measure(self, stage: str, n: int) -> None:
        print(f"\n[{time.strftime('%H:%M:%S')}] {stage}, {n:,} images", flush=True)
        try:
            rows = getattr(self, "stage_" + stage.replace("-", "_"))(n)
        except Exception as e:  # the rest of the stages still run
            message = " ".join(str(e).split())[-800:]
            rows = [{"stage": stage, "variant": "", "n": n, "error": message}]
        self.rows += rows
        columns = COLUMNS[:-1] + STAGE_COLUMNS.get(stage, []) + COLUMNS[-1:]
        print(table(shown(rows), [c for c in columns if any(r.get(c) is not None for r in rows)]))
        self.save()

    def save(self) -> None:
        s = self.settings
        record(
            sorted(self.rows, key=lambda r: (STAGES.index(r["stage"]), r["n"])),
            s.json,
            size=f"{s.height}x{s.width}",
            crop=f"{s.crop[0]}x{s.crop[1]}",
            sizes=self.sizes,
            upload_s=self.upload_s,
            targets=targets(self.rows, self.sizes),
            cores_per_gpu=cores_per_gpu(self.rows),
        )

    def report(self) -> None:
        rows = sorted(self.rows, key=lambda r: (STAGES.index(r["stage"]), r["n"]))
        columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
        print("\n" + table(shown(rows), columns))
        for stage, extra in STAGE_COLUMNS.items():
            own = [r for r in rows if r["stage"] == stage and not r.get("error")]
            if own:
                print("\n" + table(own, ["stage", "variant", "n", *extra]))
        print("\n" + table(targets(self.rows, self.sizes), ["target", "measured", "met"]))
        feeding = cores_per_gpu(self.rows)
        if feeding:
            print(
                f"\nan H100's step at 256x800 ({feeding['gpu_images_per_s']:.0f} images/s) takes "
                f"{feeding['cpus_per_gpu']:.1f} CPUs of Ray Data at "
                f"{feeding['per_cpu']:.0f} images/s per CPU (N={feeding['n']:,}, grey); "
                "cluster/ gives a GPU worker 2 CPUs and Ray Data the other 6 of an 8-CPU node"
            )

    # --- data ----------------------------------------------------------------------------------

    def full_set(self, needed: int) -> Path:
        """The cached synthetic set of at least ``needed`` images, made (and timed) if none."""
        found = sorted(
            (int(p.name.split("-")[1]), p)
            for p in self.cache.glob("full-*")
            if p.name.split("-")[1].isdigit() and (p / "train.csv").is_file()
        )
        for count, folder in found:
            if count >= needed:
                print(f"data set: {folder} ({count:,} images, made before)")
                return folder
        folder = self.cache / f"full-{needed}"
        print(f"data set: making {needed:,} images in {folder} (steelseg synth, once)", flush=True)
        self.made[needed] = self.synth_timing(needed, folder)
        return folder

    def data(self, n: int) -> Path:
        """The local data set of ``n`` images."""
        if self.full.name == f"full-{n}":
            return self.full
        return make_subset(self.full, n, self.cache / f"n{n}")

    def bucket_data(self, n: int) -> str:
        """The data set of ``n`` images in the test store (uploaded once a run)."""
        prefix = f"data/n{n}"
        if n not in self.upload_s:
            store = self.bucket()
            print(f"  uploading {n:,} images to {store.uri(prefix).split('?')[0]}", flush=True)
            started = time.monotonic()
            upload(store, self.data(n), prefix)
            self.upload_s[n] = round(time.monotonic() - started, 1)
            print(f"  uploaded in {self.upload_s[n]:.0f} s")
        return self.bucket().uri(prefix)

    def bucket(self):
        if self.store is None:
            from conftest import S3Store

            self.store = S3Store(self.logs / "moto.log")
        return self.store

    # --- running -------------------------------------------------------------------------------

    def steelseg(
        self, label: str, args: list[str], *, tty: bool = False, argv: list[str] | None = None
    ) -> Ran:
        """``python -m steelseg ARGS`` (or ``argv``) as a measured stage; a failure raises."""
        ray_tmp = Path(tempfile.mkdtemp(prefix="ssb-", dir="/tmp"))  # short: Ray's socket paths
        try:
            ran = run_command(
                argv or [sys.executable, "-m", "steelseg", *args],
                command_env(ray_tmp),
                self.logs / f"{label}.log",
                ray_tmp,
                tty=tty,
                timeout_s=self.settings.timeout_s,
            )
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        if ran.returncode != 0:
            output = ran.log.read_text(errors="replace")[-65536:]
            raise StageError(f"exit status {ran.returncode}: {last_error(output)} ({ran.log})")
        return ran

    def row(self, stage: str, n: int, ran: Ran, variant: str = "", **more) -> dict:
        row = {"stage": stage, "variant": variant, "n": n, "seconds": round(ran.seconds, 1)}
        return {**row, **ran.marks, **ran.usage, **more}

    def requests_since(self, offset: int, prefix: str) -> int:
        """Requests naming ``prefix`` in the store's log since byte ``offset``."""
        time.sleep(0.5)  # the server logs a request after answering it
        with open(self.store.log, "rb") as log:
            log.seek(offset)
            lines = log.read().decode("utf-8", "replace").splitlines()
        return sum(1 for line in lines if REQUEST.search(line) and prefix in line)

    def log_offset(self) -> int:
        return self.store.log.stat().st_size

    def check_records(self, storage: str) -> dict[str, str]:
        """Every data_check.json below ``storage`` (a local folder or the bucket's runs prefix)
        with its modification stamp."""
        from steelseg.runs import DATA_CHECK_FILE

        if not storage.startswith("s3://"):
            return {str(p): str(p.stat().st_mtime_ns) for p in Path(storage).rglob(DATA_CHECK_FILE)}
        store = self.bucket()
        pages = store.client.get_paginator("list_objects_v2").paginate(
            Bucket=store.bucket, Prefix=self.bucket_runs
        )
        found = [item for page in pages for item in page.get("Contents", [])]
        return {
            item["Key"]: f"{item['LastModified']}|{item['ETag']}"
            for item in found
            if item["Key"].endswith("/" + DATA_CHECK_FILE)
        }

    # --- stages --------------------------------------------------------------------------------

    def synth_timing(self, n: int, out: Path | None = None) -> dict:
        """``steelseg synth`` of ``n`` images, timed once and kept in ``synth-times.json``;
        into ``out`` (kept) or a scratch folder (deleted)."""
        times_file = self.cache / "synth-times.json"
        times = json.loads(times_file.read_text()) if times_file.is_file() else {}
        s = self.settings
        key = f"{n}@{s.height}x{s.width}"
        if key in times and out is None:
            return {**times[key], "cached": True}
        target = out or self.work / f"synth-{n}"
        building = target.with_name(target.name + ".tmp")
        shutil.rmtree(building, ignore_errors=True)
        try:
            ran = self.steelseg(
                f"synth-{n}",
                ["synth", str(building), "--images", str(n), "--height", str(s.height),
                 "--width", str(s.width), "--processes", str(os.cpu_count() or 1)],
            )  # fmt: skip
            if out is not None:
                building.rename(out)
        finally:
            shutil.rmtree(building, ignore_errors=True)
        row = self.row("synth", n, ran, images_per_s=round(n / ran.seconds, 2))
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        times[key] = row
        self.cache.mkdir(parents=True, exist_ok=True)
        times_file.write_text(json.dumps(times, indent=1) + "\n")
        return row

    def stage_synth(self, n: int) -> list[dict]:
        return [self.made.get(n) or self.synth_timing(n)]

    def stage_validate(self, n: int) -> list[dict]:
        data = self.data(n)
        ran = self.steelseg(f"validate-{n}", ["validate", str(data)])
        rate = round(n / ran.seconds, 1)
        return [self.row("validate", n, ran, images_per_s=rate, data_mb=data_mb(data))]

    def stage_validate_bucket(self, n: int) -> list[dict]:
        uri = self.bucket_data(n)
        offset = self.log_offset()
        ran = self.steelseg(f"validate-bucket-{n}", ["validate", uri])
        requests = self.requests_since(offset, f"data/n{n}/")
        rate = round(n / ran.seconds, 1)
        return [self.row("validate-bucket", n, ran, images_per_s=rate, requests=requests)]

    def train_flags(self, n: int, data: str, storage: str, name: str) -> list[str]:
        s = self.settings
        fraction = min(0.5, s.val_images / n)  # the same validation images at every N
        return [
            "--data", data, "--storage", storage, "--name", name, "--epochs", "1",
            "--max-steps", "2", "--num-workers", "1", "--batch-size", str(s.batch),
            "--crop-height", str(s.crop[0]), "--crop-width", str(s.crop[1]),
            "--val-fraction", f"{fraction:.6f}",
        ]  # fmt: skip

    def train_run(
        self, stage: str, n: int, flags: list[str], storage: str, variant: str, prefix: str = ""
    ) -> dict:
        """A train command (on a pseudo-terminal: its progress bar is timed) as a row."""
        before = self.check_records(storage)
        offset = self.log_offset() if prefix else 0
        ran = self.steelseg(f"{stage}-{n}-{variant}", ["train", *flags], tty=True)
        after = self.check_records(storage)
        written = sum(1 for path, stamp in after.items() if before.get(path) != stamp)
        requests = self.requests_since(offset, prefix) if prefix else None
        return self.row(stage, n, ran, variant, full_checks=written, requests=requests)

    def stage_train(self, n: int) -> list[dict]:
        data, storage = str(self.data(n)), str(self.runs)
        return [
            self.train_run("train", n, self.train_flags(n, data, storage, f"n{n}-{v}"), storage, v)
            for v in ("first", "checked")
        ]

    def stage_train_bucket(self, n: int) -> list[dict]:
        data = self.bucket_data(n)
        storage = self.bucket().uri(self.bucket_runs)
        rows = []
        for variant in ("first", "checked"):
            flags = self.train_flags(n, data, storage, f"n{n}-{variant}")
            rows.append(self.train_run("train-bucket", n, flags, storage, variant, f"data/n{n}/"))
        for variant in ("first", "checked"):  # their checkpoints: the store holds all in memory
            delete_prefix(self.bucket(), f"{self.bucket_runs}/n{n}-{variant}/")
        return rows

    def stage_resume(self, n: int) -> list[dict]:
        data, storage = str(self.data(n)), str(self.runs)
        flags = self.train_flags(n, data, storage, f"n{n}-checked")
        if not (self.runs / f"n{n}-checked").is_dir():  # the run to resume, if not made yet
            print("  training the run to resume first (not measured)")
            self.steelseg(f"resume-{n}-prepare", ["train", *flags])
        flags[flags.index("--epochs") + 1] = "2"
        flags[flags.index("--max-steps") + 1] = "4"
        return [self.train_run("resume", n, flags, storage, "resume")]

    def stage_sweep(self, n: int) -> list[dict]:
        data, storage = str(self.data(n)), str(self.runs)
        flags = self.train_flags(n, data, storage, f"sweep-n{n}")
        flags[flags.index("--max-steps") + 1] = "1"
        flags += ["--num-samples", "2", "--max-concurrent-trials", "1"]
        before = self.check_records(storage)
        checked = any(f"{os.sep}data_checks{os.sep}" in path for path in before)
        ran = self.steelseg(f"sweep-{n}", ["tune", *flags])
        after = self.check_records(storage)
        written = sum(1 for path, stamp in after.items() if before.get(path) != stamp)
        variant = "after a check" if checked else "unchecked"
        return [self.row("sweep", n, ran, variant, full_checks=written)]

    def stage_pipeline(self, n: int) -> list[dict]:
        s, rows = self.settings, []
        for variant in ("grey", "rgb"):
            argv = [sys.executable, str(Path(__file__).resolve()), "--pipeline-epoch",
                    str(self.data(n)), "--crop", f"{s.crop[0]}x{s.crop[1]}",
                    "--batch", "8", "--grey" if variant == "grey" else "--no-grey"]  # fmt: skip
            ran = self.steelseg(f"pipeline-{n}-{variant}", [], argv=argv)
            printed = [line for line in ran.tail.splitlines() if line.startswith('{"images"')]
            epoch = json.loads(printed[-1])
            row = self.row("pipeline", n, ran, variant, wall_s=round(ran.seconds, 1))
            row.update(
                seconds=round(epoch["seconds"], 1),
                images_per_s=round(epoch["images"] / epoch["seconds"], 1),
                after_first_per_s=round(epoch["after_first_per_s"], 1),
                first_batch_s=round(epoch["first_batch_s"], 2),
            )
            rows.append(row)
        return rows

    def submission(self, n: int) -> Path:
        path = self.cache / f"submission-{n}.csv"
        if not path.is_file():
            write_submission(self.data(n) / "train.csv", image_names(n), path)
        return path

    def stage_evaluate(self, n: int) -> list[dict]:
        data = self.data(n)
        args = ["evaluate", "--truth", str(data / "train.csv"), "--images",
                str(data / "train_images"), "--submission", str(self.submission(n))]  # fmt: skip
        ran = self.steelseg(f"evaluate-{n}", args)
        return [self.row("evaluate", n, ran, images_per_s=round(n / ran.seconds, 1))]

    def stage_figures(self, n: int) -> list[dict]:
        data = self.data(n)
        args = ["figures", str(self.work / f"figures-{n}"), "--data", str(data),
                "--submission", str(self.submission(n)), "--overwrite"]  # fmt: skip
        run = self.runs / f"n{n}-checked"
        if run.is_dir():
            args += ["--run", str(run)]
        ran = self.steelseg(f"figures-{n}", args)
        return [self.row("figures", n, ran, run=run.is_dir())]

    def checkpoint(self) -> Path:
        """An untrained checkpoint of the default network (the time does not depend on the
        weights), made once."""
        folder = self.cache / "checkpoint-paper-bf16"
        if not (folder / "model.pt").is_file():
            from bench_predict import synthetic_checkpoint

            synthetic_checkpoint(str(self.cache), "paper", True)
        return folder

    def stage_predict(self, n: int) -> list[dict]:
        images = self.data(n) / "train_images"
        out = self.work / "predict.csv"
        argv = [sys.executable, "-c", PREDICT_WITH_STATS, "predict", "--checkpoint",
                str(self.checkpoint()), "--images", str(images), "--out", str(out),
                "--overwrite", "--no-progress"]  # fmt: skip
        ran = self.steelseg(f"predict-{n}", [], argv=argv)
        text = ran.log.read_text(errors="replace")
        parts = {
            PREDICT_STAGES[name]: round(float(value) * UNITS[unit], 3)
            for name, value, unit in OPERATOR.findall(text)
            if name in PREDICT_STAGES
        }
        rate = round(n / ran.seconds, 2)
        return [self.row("predict", n, ran, images_per_s=rate, **parts)]


def shown(rows: list[dict]) -> list[dict]:
    """Rows as the console shows them: an error cut to its first 100 characters."""
    return [{**r, "error": r["error"][:100]} if r.get("error") else r for r in rows]


def upload(store, folder: Path, prefix: str) -> None:
    """Every file of ``folder`` to ``prefix`` in the store, 8 at a time."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]

    def put(path: Path) -> None:
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        store.client.upload_file(str(path), store.bucket, key)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, files))


def delete_prefix(store, prefix: str) -> None:
    pages = store.client.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=prefix
    )
    for page in pages:
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            store.client.delete_objects(Bucket=store.bucket, Delete={"Objects": keys})


# --- targets -------------------------------------------------------------------------------------


def find(rows: list[dict], stage: str, variant: str, n: int, key: str = "seconds"):
    """``key`` of the row of ``stage``, ``variant`` and ``n`` (None: not measured, or failed)."""
    for r in rows:
        if (r["stage"], r.get("variant", ""), r["n"]) == (stage, variant, n) and not r.get("error"):
            return r.get(key)
    return None


def label(row: dict) -> str:
    return f"{row['stage']} {row.get('variant', '')}".strip() + f", {row['n']:,}"


class Targets:
    """The issue's targets, each with its figures and MET, MISSED or '' (not measured)."""

    def __init__(self, rows: list[dict], sizes: list[int]):
        self.rows, self.small, self.large = rows, min(sizes), max(sizes)
        self.found: list[dict] = []

    def add(self, target: str, measured: str | None, met: bool | None) -> None:
        verdict = "" if met is None else ("MET" if met else "MISSED")
        self.found.append({"target": target, "measured": measured, "met": verdict})

    def at_most(self, target: str, value: float | None, limit: float, unit: str) -> None:
        shown = None if value is None else f"{value:.1f} {unit}"
        self.add(target, shown, None if value is None else value <= limit)

    def linear(self) -> None:
        """Each stage's time at N_max against N_min, at most 13x for 12,568 against 1,000."""
        small, large = self.small, self.large
        if small == large:
            return
        bound = LINEAR_SLACK * large / small
        groups = {(r["stage"], r.get("variant", "")) for r in self.rows}
        for stage, variant in sorted(groups, key=lambda g: (STAGES.index(g[0]), g[1])):
            a, b = find(self.rows, stage, variant, small), find(self.rows, stage, variant, large)
            if a and b:
                name = f"{stage} {variant}".strip()
                measured = f"{a:.1f} s -> {b:.1f} s ({b / a:.1f}x)"
                self.add(
                    f"{name}: time at {large:,} <= {bound:.1f}x at {small:,}",
                    measured,
                    b / a <= bound,
                )

    def limits(self) -> None:
        rows, large = self.rows, self.large
        for stage, limit in (("train", FIRST_STEP_LOCAL_S), ("train-bucket", FIRST_STEP_BUCKET_S)):
            first = find(rows, stage, "checked", large, "first_step_s")
            self.at_most(
                f"{stage}, checked once, {large:,}: first step <= {limit:.0f} s", first, limit, "s"
            )
        seconds = find(rows, "validate", "", large)
        self.at_most(
            f"validate {large:,} local images <= {VALIDATE_S:.0f} s", seconds, VALIDATE_S, "s"
        )
        drivers = [r for r in rows if r.get("driver_mb") and not r.get("error")]
        if drivers:
            worst = max(drivers, key=lambda r: r["driver_mb"])
            measured = f"{worst['driver_mb']} MB ({label(worst)})"
            self.add(f"driver RSS < {DRIVER_MB:.0f} MB", measured, worst["driver_mb"] < DRIVER_MB)

    def store(self) -> None:
        """The object store's peak does not grow with the data set; nothing spills."""
        ratios = []
        for r in self.rows:
            if r["n"] == self.large and r.get("store_mb") and not r.get("error"):
                before = find(self.rows, r["stage"], r.get("variant", ""), self.small, "store_mb")
                if before:
                    ratios.append((r["store_mb"] / before, r))
        if ratios:
            ratio, worst = max(ratios, key=lambda x: x[0])
            target = f"object store peak at {self.large:,} <= {STORE_GROWTH:.0f}x at {self.small:,}"
            measured = f"{ratio:.1f}x at most ({label(worst)}: {worst['store_mb']:.0f} MB)"
            self.add(target, measured, ratio <= STORE_GROWTH)
        measured = [r for r in self.rows if r.get("spilled_mb") is not None]
        if measured:
            worst = max(measured, key=lambda r: r["spilled_mb"])
            shown = f"{worst['spilled_mb']:.0f} MB at most ({label(worst)})"
            self.add("nothing spilled from the object store", shown, worst["spilled_mb"] == 0)

    def no_reread(self) -> None:
        for stage in ("resume", "sweep"):
            checks = [r for r in self.rows if r["stage"] == stage and "full_checks" in r]
            if checks:
                counts = ", ".join(f"{r['full_checks']} at {r['n']:,}" for r in checks)
                met = all(r["full_checks"] == 0 for r in checks)
                self.add(f"{stage}: no data check that decodes the images", counts, met)

    def pipeline(self) -> None:
        """Images/s per CPU after the epoch's first batch (its start is not the steady rate)."""
        small, large, key = self.small, self.large, "after_first_per_s"
        a = find(self.rows, "pipeline", "grey", small, key)
        b = find(self.rows, "pipeline", "grey", large, key)
        if a and b:
            target = f"pipeline (grey) per CPU at {large:,} >= 0.9x at {small:,}"
            self.add(target, f"{a:.0f} -> {b:.0f} images/s", b >= 0.9 * a)
        if b:
            rgb = find(self.rows, "pipeline", "rgb", large, key)
            target = f"pipeline (grey) per CPU at {large:,} >= {PIPELINE_PER_CPU:.0f} images/s"
            self.add(target, f"{b:.0f} images/s (rgb: {rgb})", b >= PIPELINE_PER_CPU)


def targets(rows: list[dict], sizes: list[int]) -> list[dict]:
    found = Targets(rows, sizes)
    found.linear()
    found.limits()
    found.store()
    found.no_reread()
    found.pipeline()
    return found.found


def cores_per_gpu(rows: list[dict]) -> dict:
    """CPUs of Ray Data that keep up with an H100's step at 256x800 (bench_pipeline's figure),
    from the grey pipeline's images/s per CPU at the largest size measured."""
    grey = [r for r in rows if r["stage"] == "pipeline" and r.get("variant") == "grey"]
    measured = [r for r in grey if r.get("after_first_per_s")]
    if not measured:
        return {}
    from bench_pipeline import GPU_STEP_IMAGES_PER_S

    best = max(measured, key=lambda r: r["n"])
    gpu, per_cpu = GPU_STEP_IMAGES_PER_S["256x800"], best["after_first_per_s"]
    return {
        "n": best["n"],
        "per_cpu": per_cpu,
        "gpu_images_per_s": gpu,
        "cpus_per_gpu": round(gpu / per_cpu, 2),
    }


# --- the pipeline stage's own process ------------------------------------------------------------


def pipeline_epoch(data: str, crop: tuple[int, int], batch: int, grey: bool) -> None:
    """One epoch of the training pipeline over ``data`` consumed in this process (a
    ``train_dataset`` of that epoch alone, one CPU); prints, last, the images, the epoch's
    seconds and the seconds to its first batch."""
    import ray
    from bench_pipeline import consume

    from steelseg.config import TrainConfig
    from steelseg.data import catalog, pipeline

    rows = catalog.load(data, decode_images=False)
    config = TrainConfig(data=data, batch_size=batch, crop_height=crop[0], crop_width=crop[1])
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        pipeline.ordered_context()
        epoch_rows = pipeline.train_rows(rows, config.seed, 0, rank=0, world=1)
        places = {0: epoch_rows.index.to_numpy()}
        dataset = pipeline.train_dataset(rows, places, config, grey=grey)
        batches = iter(dataset.iter_torch_batches(batch_size=batch))
        start = time.perf_counter()
        head = next(batches)
        first = len(head["image"])
        first_s = time.perf_counter() - start
        # consume checks that the epoch delivers each of its rows once: the first batch's too
        rest, rest_s, _ = consume(itertools.chain([head], batches), len(epoch_rows))
        rest -= first
    finally:
        ray.shutdown()
    found = {"images": first + rest, "seconds": first_s + rest_s, "first_batch_s": first_s}
    print(json.dumps({**found, "after_first_per_s": rest / rest_s}), flush=True)


def size_pair(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,4000,12568", help="images, comma-separated")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--crop", type=size_pair, default=(256, 800), help="training crop HxW")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated: %(default)s")
    parser.add_argument("--predict-images", type=int, default=500)
    parser.add_argument("--test-images", type=int, default=5506, help="evaluate/figures also at")
    parser.add_argument("--val-images", type=int, default=32, help="train's validation images")
    parser.add_argument("--batch", type=int, default=4, help="train's batch size")
    parser.add_argument("--cache", help="default ~/.cache/steelseg/bench_scale/HxW")
    parser.add_argument("--json", default="scale_256x1600_cpu2.json")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds a command may take")
    parser.add_argument("--keep-runs", action="store_true", help="keep the runs' folder")
    parser.add_argument("--fresh", action="store_true", help="drop the rows already in --json")
    parser.add_argument(
        "--failed", action="store_true", help="run only the stages whose row in --json failed"
    )
    parser.add_argument("--pipeline-epoch", metavar="DATA", help=argparse.SUPPRESS)
    parser.add_argument("--grey", action=argparse.BooleanOptionalAction, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pipeline_epoch:
        pipeline_epoch(args.pipeline_epoch, args.crop, args.batch, args.grey)
        return
    stages = args.stages.split(",")
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; known: {', '.join(STAGES)}")
    default_cache = f"~/.cache/steelseg/bench_scale/{args.height}x{args.width}"
    settings = Settings(
        sizes=[int(n) for n in args.sizes.split(",")], height=args.height, width=args.width,
        crop=args.crop, stages=stages, predict_images=args.predict_images,
        test_images=args.test_images, val_images=args.val_images, batch=args.batch,
        cache=Path(os.path.expanduser(args.cache or default_cache)), json=args.json,
        timeout_s=args.timeout, keep_runs=args.keep_runs, fresh=args.fresh, failed=args.failed,
    )  # fmt: skip
    Bench(settings).run()


if __name__ == "__main__":
    main()
