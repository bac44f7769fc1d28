"""Load on the HTTP service: `steelseg serve` on 127.0.0.1 (a local Ray of its own), a fixed
number of requests of one 256x1600 JPEG each, sent by ``requests`` from 1, 4 and 16 threads,
with batching on the replicas and without; throughput and p50/p99 latency per setting. Every
answer is checked against `steelseg predict`'s submission for the same image (identical RLEs).

    python benchmarks/bench_serve.py --arch paper,unet-resnet18 --concurrency 1,4,16 \\
        --requests 32 --json serve_256x1600_cpu2.json

The images: the three real ones of tests/real and synthetic ones, 16 in all, sent in turn. The
model: untrained, as timing needs no training, with rules (stored as calibrate stores them)
under which it marks about a tenth of the pixels, so that the compared RLEs are not empty.
Service and predict alike run ``--replicas`` model replicas (predict: actors) of one CPU each,
so they compute the same probabilities (the number of threads changes the float sums). Each
service gets one warm-up round of 16 requests, not counted. The run stops by itself: every
request has a timeout, and the service is stopped with SIGTERM.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import requests
import torch
from common import record, table
from PIL import Image

from steelseg import runs
from steelseg.config import TrainConfig
from steelseg.data import synth
from steelseg.inference.postprocess import ClassRule, Rules
from steelseg.inference.predict import prepare, probabilities
from steelseg.training.recipe import build_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from raynodes import descendants, end_trees, free_port  # noqa: E402

H, W = 256, 1600
TIMEOUT_S = 600  # a request's


def write_images(folder: Path, count: int = 16) -> list[Path]:
    folder.mkdir(parents=True)
    for path in sorted((ROOT / "tests" / "real" / "train_images").glob("*.jpg")):
        (folder / path.name).write_bytes(path.read_bytes())
    spec = synth.SynthSpec(H, W, seed=5)
    for i in range(count - len(list(folder.iterdir()))):
        grey = synth.make_image(spec, i)[0]["visible"]
        Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(folder / f"s{i:02d}.jpg")
    return sorted(folder.iterdir())


def make_run(folder: Path, arch: str, files: list[Path]) -> Path:
    """An untrained ``arch`` with rules under which it marks about a tenth of these images'
    pixels: a threshold per class, components, areas and a gate at work."""
    config = TrainConfig(arch=arch, head_prior=0.3)
    torch.manual_seed(0)
    model = build_model(config)
    checkpoint = folder / "epoch_0001"
    state = {"model": model.state_dict(), "config": config.to_dict()}
    runs.write_state(checkpoint, {**state, "epoch": 1, "metrics": {}})
    cpu = torch.device("cpu")
    net = prepare(model.eval(), cpu, amp=False)
    probs = np.concatenate([
        probabilities(net, np.asarray(Image.open(f).convert("RGB"))[None], cpu, amp=False)
        for f in files[:4]
    ])  # fmt: skip
    q90 = [float(np.quantile(probs[:, c], 0.9)) for c in range(4)]
    gate = float(np.median(probs[:, 3].reshape(len(probs), -1).max(axis=1)))
    rules = (ClassRule(q90[0]), ClassRule(q90[1], min_component=50),
             ClassRule(q90[2], min_area=2000), ClassRule(q90[3], gate=gate))  # fmt: skip
    runs.save_rules(checkpoint, Rules(rules, (H, W)))
    return folder


def predicted(run: Path, images: Path, replicas: int, env: dict) -> dict[str, list[str]]:
    """`steelseg predict`'s RLE strings of each image, as a user runs it."""
    out = images.parent / f"{run.name}.csv"
    argv = [sys.executable, "-m", "steelseg", "predict", "--checkpoint", str(run),
            "--images", str(images), "--out", str(out), "--actors", str(replicas),
            "--batch-size", "4", "--no-progress", "--overwrite"]  # fmt: skip
    subprocess.run(argv, env=env, check=True, timeout=1800)
    submission = pd.read_csv(out, keep_default_na=False).sort_values(["ImageId", "ClassId"])
    return submission.groupby("ImageId")["EncodedPixels"].apply(list).to_dict()


class Service:
    """`steelseg serve` as a process of its own, until ``stop``."""

    def __init__(self, run: Path, env: dict, log: Path, *flags: str):
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [sys.executable, "-m", "steelseg", "serve", str(run), "--port",
                self.url.rsplit(":", 1)[1], *flags]  # fmt: skip
        with open(log, "w") as out:
            self.process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the service did not start: {log.read_text()[-2000:]}")
            time.sleep(1)

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/healthz", timeout=10).status_code == 200
        except requests.RequestException:  # not listening yet, or busy starting
            return False

    def stop(self) -> None:
        """SIGTERM, as a user stops it; its whole process tree ended if it is still there."""
        tree = descendants(self.process.pid)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            end_trees(tree)
            self.process.wait()


def load(url: str, files: list[Path], expected: dict, count: int, concurrency: int) -> dict:
    """``count`` requests from ``concurrency`` threads, each a session of its own; returns
    the timings and how many answers differed from predict's."""
    bodies = [(f.name, f.read_bytes()) for f in files]
    sessions = {}

    def send(i: int) -> tuple[float, int, bool]:
        session = sessions.setdefault(threading.get_ident(), requests.Session())
        name, body = bodies[i % len(bodies)]
        start = time.perf_counter()
        answer = session.post(f"{url}/predict", data=body, timeout=TIMEOUT_S,
                              headers={"Content-Type": "image/jpeg"})  # fmt: skip
        seconds = time.perf_counter() - start
        if answer.status_code != 200:
            return seconds, answer.status_code, False
        found = [c["rle"] for c in answer.json()["images"][0]["classes"]]
        return seconds, 200, found == expected[name]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(send, range(count)))
    wall = time.perf_counter() - start
    latencies = np.array([seconds for seconds, _, _ in results])
    return {
        "requests": count,
        "seconds": wall,
        "img_per_s": count / wall,
        "p50_s": float(np.percentile(latencies, 50)),
        "p99_s": float(np.percentile(latencies, 99)),
        "not_200": sum(status != 200 for _, status, _ in results),
        "differ_from_predict": sum(not same for _, status, same in results if status == 200),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="paper,unet-resnet18")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="per setting (32)")
    parser.add_argument("--replicas", type=int, default=2, help="of one CPU each (2)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="batching on (8)")
    parser.add_argument("--batch-wait-s", type=float, default=0.05)
    parser.add_argument("--json", help="results file (a bare name goes to benchmarks/results/)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="steelseg-bench-") as tmp:
        tmp = Path(tmp)
        # a Ray of its own for every service and predict: never another session's cluster
        env = {**os.environ, "RAY_TMPDIR": str(tmp / "ray")}
        env.pop("RAY_ADDRESS", None)
        files = write_images(tmp / "images")
        for arch in args.arch.split(","):
            run = make_run(tmp / arch, arch, files)
            expected = predicted(run, tmp / "images", args.replicas, env)
            for batch in (args.max_batch_size, 1):
                flags = ("--image-size", f"{H}x{W}", "--replicas", str(args.replicas),
                         "--cpus-per-replica", "1", "--max-batch-size", str(batch),
                         "--batch-wait-s", str(args.batch_wait_s))  # fmt: skip
                service = Service(run, env, tmp / f"{arch}-{batch}.log", *flags)
                try:
                    load(service.url, files, expected, 16, 16)  # warm-up
                    for concurrency in (int(c) for c in args.concurrency.split(",")):
                        found = load(service.url, files, expected, args.requests, concurrency)
                        row = {"arch": arch, "max_batch_size": batch, "concurrency": concurrency,
                               **found}  # fmt: skip
                        rows.append(row)
                        print(table([row], list(row)), flush=True)
                finally:
                    service.stop()
    columns = ["arch", "max_batch_size", "concurrency", "requests", "img_per_s", "p50_s",
               "p99_s", "not_200", "differ_from_predict"]  # fmt: skip
    print(table(rows, columns))
    if args.json:
        record(rows, args.json, replicas=args.replicas, size=f"{H}x{W}",
               batch_wait_s=args.batch_wait_s, load_average=os.getloadavg())  # fmt: skip


if __name__ == "__main__":
    main()
