"""RLE and synthetic-data throughput at the real size, 256x1600, on this machine.

    python benchmarks/bench_data.py [--images 1000]

Decode is compared with the per-run Python loop of the common public kernel and with the
floor: allocating and writing one 256x1600 mask. Masks are real-sized: the real strings in
tests/data plus synthetic masks chosen to span 26 to 1,400 runs, as real strings do.
"""

import argparse
import os
import tempfile
import time
import timeit
from pathlib import Path

import numpy as np
import pandas as pd

from steelseg.data import rle, synth

H, W = 256, 1600
DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def loop_decode(encoded: str, height: int, width: int) -> np.ndarray:
    """The common public kernel: parse with split(), one slice assignment per run."""
    s = encoded.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0::2], s[1::2])]
    starts -= 1
    mask = np.zeros(height * width, dtype=np.uint8)
    for lo, n in zip(starts, lengths):
        mask[lo : lo + n] = 1
    return mask.reshape(width, height).T


def loop_encode(mask: np.ndarray) -> str:
    """The common public kernel (mask2rle)."""
    pixels = np.concatenate([[0], mask.T.flatten(), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def realistic_strings() -> list[str]:
    strings = list(pd.read_csv(DATA / "train.csv")["EncodedPixels"])
    strings.append((DATA / "rle_0002cc93b_class1.txt").read_text().strip())
    spec = synth.SynthSpec(H, W, seed=0)
    for i in range(200):
        for d in synth.make_image(spec, i)[1]:
            strings.append(rle.encode(d.mask))
    return [s for s in strings if 26 <= len(s.split()) // 2 <= 1400]


def per_second(fn, items, repeat=3) -> float:
    """Items per second; results are dropped at once, as a data loader's are consumed."""

    def run():
        for x in items:
            fn(x)

    best = min(timeit.repeat(run, number=1, repeat=repeat))
    return len(items) / best


def bench_rle() -> None:
    strings = realistic_strings()
    runs = np.array([len(s.split()) // 2 for s in strings])
    masks = [rle.decode(s, H, W) for s in strings]
    c_masks = [np.ascontiguousarray(m) for m in masks]
    assert all((loop_decode(s, H, W) == m).all() for s, m in zip(strings, masks))
    assert all(loop_encode(m) == s for s, m in zip(strings, c_masks))
    print(
        f"{len(strings)} masks at {H}x{W}, runs per mask: median {int(np.median(runs))}, "
        f"range {runs.min()}..{runs.max()}, mean area {np.mean([m.mean() for m in masks]):.2%}"
    )
    floor = per_second(lambda _: np.zeros((H, W), np.uint8).fill(1), strings)
    ours = per_second(lambda s: rle.decode(s, H, W), strings)
    loop = per_second(lambda s: loop_decode(s, H, W), strings)
    parsed = [rle.run_lengths(s, H, W) for s in strings]
    fill = per_second(lambda k: np.repeat(rle._values(k.size), k), parsed)
    parse = per_second(lambda s: np.fromstring(s, dtype=np.int64, sep=" "), strings)
    out = rle.empty_masks(4, H, W)
    groups = [strings[i : i + 4] for i in range(0, len(strings) - 3, 4)]
    four = per_second(lambda g: rle.decode_classes(g, H, W, out=out), groups) * 4
    four_new = per_second(lambda g: rle.decode_classes(g, H, W), groups) * 4
    enc_f = per_second(rle.encode, masks)
    enc_c = per_second(rle.encode, c_masks)
    enc_loop = per_second(loop_encode, c_masks)
    rows = [
        ("floor: allocate + write one mask", floor),
        ("decode (steelseg.data.rle)", ours),
        ("  of which: text to integers (fromstring)", parse),
        ("  of which: fill from parsed runs", fill),
        ("decode, per-run Python loop", loop),
        ("decode_classes, 4 per image, prealloc", four),
        ("decode_classes, 4 per image, new array", four_new),
        ("encode, Fortran-order mask (as decoded)", enc_f),
        ("encode, C-order mask (e.g. a PNG label)", enc_c),
        ("encode, public mask2rle", enc_loop),
    ]
    print(f"{'':42s} {'masks/s':>9s} {'us/mask':>8s} {'x floor':>8s}")
    for name, rate in rows:
        print(f"{name:42s} {rate:9.0f} {1e6 / rate:8.1f} {floor / rate:8.2f}")
    long = [s for s, r in zip(strings, runs) if r >= 500]
    if long:
        print(
            f"decode of the {len(long)} masks with >= 500 runs: "
            f"{per_second(lambda s: rle.decode(s, H, W), long):.0f}/s vs loop "
            f"{per_second(lambda s: loop_decode(s, H, W), long):.0f}/s"
        )


def bench_synth(n_images: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        synth.write_dataset(Path(tmp) / "d", n_images, height=H, width=W, seed=0)
        elapsed = time.perf_counter() - start
    print(
        f"steelseg synth: {n_images} images at {H}x{W} in {elapsed:.1f} s = "
        f"{n_images / elapsed:.0f} images/s on {os.cpu_count()} cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    bench_rle()
    bench_synth(args.images)


if __name__ == "__main__":
    main()
