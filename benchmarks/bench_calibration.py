"""Dice before and after calibration, next to the all-empty baseline, for a default-recipe model
trained from random weights with the bare training step (no Ray, so it runs on the lent GPU).

    python benchmarks/bench_calibration.py --height 64 --width 320 --steps 400 --out /tmp/cal

It writes a synthetic data set (train + val) and a held-out one (another seed) in the Severstal
layout, trains, saves a checkpoint and the split as a training run does, runs
``steelseg.inference.calibrate.calibrate`` on the validation split, then predicts the held-out
images (the prediction actor's code, called directly; no Ray is imported) with threshold 0.5
and with the calibrated rules, and scores both with ``steelseg.evaluation.score``."""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from steelseg import runs
from steelseg.config import TrainConfig
from steelseg.data import catalog, images, rle, synth
from steelseg.domain import CLASS_IDS
from steelseg.evaluation.score import score_submission
from steelseg.inference import predict
from steelseg.inference.calibrate import calibrate
from steelseg.model.inputs import autocast_dtype
from steelseg.training import epoch, recipe


def load_arrays(table) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, H, W, 3) and class bits (N, H, W) in memory: the bare step does no data work."""
    images_, bits = [], []
    for _, row in table.iterrows():
        image = images.read_image(row["path"])
        masks = rle.decode_classes([row[f"rle_{c}"] for c in CLASS_IDS], *image.shape[:2])
        images_.append(image)
        bits.append(sum((masks[c] << c).astype(np.uint8) for c in range(4)))
    return np.stack(images_), np.stack(bits)


def batches(arrays, rng, steps, batch):
    images_, bits = arrays
    for _ in range(steps):
        idx = rng.integers(len(images_), size=batch)
        flip = rng.random(batch) < 0.5
        image, mask = images_[idx], bits[idx]
        image[flip], mask[flip] = image[flip, :, ::-1], mask[flip, :, ::-1]
        yield {"image": torch.from_numpy(image), "mask": torch.from_numpy(mask)}


def score(checkpoint: Path, test: Path, rules, device, batch: int) -> dict:
    table = predict.image_paths(test / "train_images", ["visible"])
    actor = predict.Predictor(str(checkpoint), False, rules, device.type == "cuda")
    start = time.perf_counter()
    rows = [{k: v.to_numpy() for k, v in table.iloc[i : i + batch].items()}
            for i in range(0, len(table), batch)]  # fmt: skip
    out = [predict.predict_in_process(actor, r, ["visible"]) for r in rows]
    seconds = time.perf_counter() - start
    results = pd.concat([pd.DataFrame(o) for o in out])
    submission = checkpoint / f"submission_{'calibrated' if rules else 'plain'}.csv"
    predict.to_submission(results).to_csv(submission, index=False)
    scores = score_submission(str(test / "train.csv"), str(test / "train_images"), str(submission))
    return {"kaggle_dice": scores.kaggle_dice, "baseline": scores.empty_baseline,
            "dice_defects": scores.dice_nonempty, "images_per_s": len(table) / seconds}  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--images", type=int, default=1000, help="train + val")
    parser.add_argument("--test-images", type=int, default=400)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    size = dict(height=args.height, width=args.width)
    data = synth.write_dataset(out / "data", args.images, seed=args.seed, **size)
    test = synth.write_dataset(out / "test", args.test_images, seed=args.seed + 1000, **size)
    table = catalog.load(data, report=lambda *_: None)
    train, val = catalog.split(table, val_fraction=0.2, seed=args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = TrainConfig(data=str(data), batch_size=args.batch, seed=args.seed)
    torch.manual_seed(args.seed)
    model = recipe.build_model(config).to(device)
    optimizer = recipe.build_optimizer(config, model)
    scheduler = recipe.build_scheduler(config, optimizer, args.steps)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    stream = batches(load_arrays(train), rng, args.steps, args.batch)
    loss_fn = recipe.build_loss(config).to(device)
    epoch.train_one_epoch(
        model,
        stream,
        loss_fn,
        optimizer,
        scheduler,
        device,
        amp=autocast_dtype(device, True) is not None,
    )
    train_seconds = time.perf_counter() - start
    run = out / "run"
    checkpoint = run / "epoch_0001"
    checkpoint.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "config": config.to_dict(), "epoch": 1}
    runs.write_state(checkpoint, state)
    runs.write_split(run, train, val)
    rules, report, _ = calibrate(checkpoint, batch_size=args.batch)
    plain = score(checkpoint, test, None, device, args.batch)
    calibrated = score(checkpoint, test, runs.load_rules(checkpoint).to_dict(), device, args.batch)
    result = {
        "size": f"{args.height}x{args.width}",
        "steps": args.steps,
        "batch": args.batch,
        "train_seconds": round(train_seconds, 1),
        "val_images": report["images"],
        "val_before": report["kaggle_dice_before"],
        "val_after": report["kaggle_dice_after"],
        "val_baseline": report["empty_baseline"],
        "test_images": args.test_images,
        "test_plain": plain,
        "test_calibrated": calibrated,
        "rules": rules.to_dict()["classes"],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
