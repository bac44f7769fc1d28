"""Epoch time with checkpoints uploaded synchronously or asynchronously to an S3-compatible store.

    python benchmarks/bench_checkpoint.py                      # moto_server on 127.0.0.1
    python benchmarks/bench_checkpoint.py --storage s3://bucket/bench   # your store

Trains the same small run twice on a local Ray (1 worker), ``checkpoint_upload`` sync then
async, with the run in the store, and times each epoch on the driver from rank 0's epoch events
(the first epoch, with Ray's start-up, is left out). Every epoch writes a checkpoint of about
210 MB (model 71 MB, optimizer state 142 MB). Prints a table and writes JSON to
``benchmarks/results/``.
"""

import argparse
import datetime
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def start_moto() -> tuple[subprocess.Popen, str]:
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    binary = str(Path(sys.executable).with_name("moto_server"))
    server = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            break
        except Exception:
            time.sleep(0.2)
    return server, f"s3://bench/runs?endpoint_override={endpoint}"


def epoch_seconds(storage: str, data: Path, mode: str, epochs: int) -> list[float]:
    from steelseg.config import TrainConfig
    from steelseg.training.fit import fit

    stamps: list[float] = []
    config = TrainConfig(
        data=str(data), storage=storage, name=f"{mode}-{int(time.time())}", epochs=epochs,
        num_workers=1, batch_size=4, log_images=0, keep_checkpoints=2, checkpoint_upload=mode,
        val_fraction=0.25,
    )  # fmt: skip
    result = fit(config, on_progress=lambda e: e[0] == "epoch" and stamps.append(time.time()))
    if result.error:
        raise SystemExit(f"{mode}: {result.error}")
    return [round(b - a, 2) for a, b in itertools.pairwise(stamps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", help="s3:// or gs:// URI (default: a moto_server here)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=160)
    args = parser.parse_args()

    from steelseg.cluster import init_ray
    from steelseg.data import synth

    server, storage = (None, args.storage) if args.storage else start_moto()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = synth.write_dataset(
                Path(tmp) / "d", args.images, height=args.height, width=args.width, seed=0
            )
            init_ray(2)
            rows = []
            for mode in ("sync", "async"):
                times = epoch_seconds(storage, data, mode, args.epochs)
                rows.append({"mode": mode, "epoch_s": times, "mean_s": sum(times) / len(times)})
                print(f"{mode:5s}  mean epoch {rows[-1]['mean_s']:.2f} s  epochs 2..: {times}")
    finally:
        if server:
            server.terminate()
    result = {
        "benchmark": "checkpoint_upload",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(sys.argv),
        "store": "moto_server on 127.0.0.1" if server else storage.split("?")[0],
        "run": f"{args.images} images {args.height}x{args.width}, 1 worker, batch 4",
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"checkpoint_upload_{result['date']}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
