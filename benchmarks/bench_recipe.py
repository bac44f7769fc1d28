"""Which recipe learns from random weights on a small budget? The bare training step (no Ray), on
synthetic Severstal-like data, for several recipes side by side.

    python benchmarks/bench_recipe.py --height 64 --width 320 --steps 400
    python benchmarks/bench_recipe.py --height 256 --width 1600 --crop 256x512 --steps 600

Each recipe trains the paper's UNet from random weights and is scored on full-size validation
images: Kaggle Dice next to the all-empty baseline, Dice over pairs with a defect, and the share
of pairs predicted empty (1.0 = collapsed to "no defect anywhere").
"""

import argparse
import json
import os
import time
from multiprocessing import Pool

import numpy as np
import torch

from steelseg.config import TrainConfig
from steelseg.data import synth
from steelseg.model.unet import UNet
from steelseg.training import epoch, recipe

RECIPES = {
    # the common public recipe: Adam 5e-4, BCE + Dice, PyTorch's default init, constant LR
    "public": dict(init=False, optimizer="adam", lr=5e-4, warmup_steps=0, schedule=False),
    "public+init": dict(init=True, optimizer="adam", lr=5e-4, warmup_steps=0, schedule=False),
    "default": dict(),
    "default-no-init": dict(init=False),
    "default-lr3e-4": dict(lr=3e-4),
    "default-lr3e-3": dict(lr=3e-3),
    "default-no-warmup": dict(warmup_steps=0),
    "default-bce1-dice1": dict(bce_weight=1.0, dice_weight=1.0),
    "default-bce.75-dice.25": dict(bce_weight=0.75, dice_weight=0.25),
    "default-lr2e-3": dict(lr=2e-3),
    "default-pos3": dict(pos_weight=[3.0] * 4),
    "default-prior.05": dict(head_prior=0.05),
    "default-bce.5-dice.5": dict(bce_weight=0.5, dice_weight=0.5),
}


def make_sample(args):
    spec, index = args
    images, defects = synth.make_image(spec, index)
    bits = np.zeros((spec.height, spec.width), np.uint8)
    for d in defects:
        bits |= d.mask << np.uint8(d.class_id - 1)
    visible = np.repeat(images["visible"][..., None], 3, axis=-1)
    extra = [images[m][..., None] for m in spec.modalities[1:]]
    return np.concatenate([visible, *extra], axis=-1), bits


def make_data(n, height, width, seed, modalities=("visible",)):
    spec = synth.SynthSpec(height, width, seed, tuple(modalities))
    with Pool(os.cpu_count()) as pool:
        pairs = pool.map(make_sample, [(spec, i) for i in range(n)], chunksize=8)
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def crop_and_flip(rng, images, bits, crop):
    """A random ``crop`` (H, W) of each image and its mask (None: whole), half of them flipped
    horizontally: the public starter kernels' augmentation."""
    n, h, w = images.shape[:3]
    ch, cw = crop or (h, w)
    y0 = rng.integers(0, h - ch + 1, size=n)
    x0 = rng.integers(0, w - cw + 1, size=n)
    img = np.stack([im[a : a + ch, b : b + cw] for im, a, b in zip(images, y0, x0)])
    msk = np.stack([m[a : a + ch, b : b + cw] for m, a, b in zip(bits, y0, x0)])
    flip = rng.random(n) < 0.5
    img[flip] = img[flip, :, ::-1]
    msk[flip] = msk[flip, :, ::-1]
    return img, msk


def random_batch(rng, images, bits, batch_size, crop):
    idx = rng.integers(len(images), size=batch_size)
    img, msk = crop_and_flip(rng, images[idx], bits[idx], crop)
    return {"image": torch.from_numpy(img), "mask": torch.from_numpy(msk)}


def val_batches(images, bits, batch_size):
    for i in range(0, len(images), batch_size):
        img = images[i : i + batch_size]
        yield {"image": torch.from_numpy(img), "mask": torch.from_numpy(bits[i : i + batch_size])}


def run_recipe(name, overrides, data, args, device, seed):
    options = dict(init=True, optimizer="adamw", schedule=True)
    options.update({k: overrides[k] for k in list(overrides) if k in options})
    config = TrainConfig(**{k: v for k, v in overrides.items() if k not in options})
    channels = data[0].shape[-1]
    config = config.replace(modalities=args.modalities[: channels - 2])
    torch.manual_seed(seed)
    model = recipe.build_model(config) if options["init"] else UNet(4, channels)
    model.to(device)
    loss_fn = recipe.build_loss(config)
    if options["optimizer"] == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    else:
        optimizer = recipe.build_optimizer(config, model)
    total = args.steps
    if options["schedule"]:
        scheduler = recipe.build_scheduler(config, optimizer, total)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    rng = np.random.default_rng(seed)
    train_images, train_bits, val_images, val_bits = data
    batches = (
        random_batch(rng, train_images, train_bits, args.batch, args.crop) for _ in range(total)
    )
    start = time.perf_counter()
    loss_sum, seen, _ = epoch.train_one_epoch(
        model, batches, loss_fn, optimizer, scheduler, device, amp=device.type == "cuda"
    )
    seconds = time.perf_counter() - start
    _, _, counts, _ = epoch.validate_one_epoch(
        model,
        val_batches(val_images, val_bits, args.batch),
        loss_fn,
        device,
        amp=device.type == "cuda",
    )
    s = counts.compute()
    pred_empty = 1 - float(counts.totals[5].sum() / counts.totals[0].sum())
    return {
        "recipe": name,
        "seed": seed,
        "kaggle_dice": s.kaggle_dice,
        "baseline": s.empty_baseline,
        "dice_defects": s.dice_nonempty,
        "pred_empty": pred_empty,
        "final_train_loss": loss_sum / seen,
        "seconds": seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--crop", default="", help="HxW training crop, e.g. 256x512")
    parser.add_argument("--train-images", type=int, default=800)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--json", default="")
    parser.add_argument(
        "--modalities", default="visible", help="data made with these, e.g. visible,ir"
    )
    parser.add_argument("--fusion", action="store_true", help="train on visible only and on all")
    args = parser.parse_args()
    args.crop = tuple(int(v) for v in args.crop.split("x")) if args.crop else None
    args.modalities = args.modalities.split(",")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time.perf_counter()
    train = make_data(args.train_images, args.height, args.width, 1, args.modalities)
    val = make_data(args.val_images, args.height, args.width, 2, args.modalities)
    print(
        f"data: {args.train_images}+{args.val_images} images {args.height}x{args.width} "
        f"in {time.perf_counter() - t:.0f} s; crop {args.crop}; {args.steps} steps of "
        f"{args.batch} on {device}"
    )
    rows = []
    print(
        f"{'recipe':24s} {'seed':>4s} {'kaggle':>7s} {'base':>6s} {'defects':>7s} "
        f"{'pred_empty':>10s} {'loss':>6s} {'s':>5s}"
    )
    inputs = {"": (*train, *val)}
    if args.fusion:
        inputs = {
            "visible:": (train[0][..., :3], train[1], val[0][..., :3], val[1]),
            "fused:": (*train, *val),
        }
    runs = [(p, n, s) for p in inputs for n in args.recipes.split(",") for s in range(args.seeds)]
    for prefix, recipe_name, seed in runs:
        r = run_recipe(recipe_name, RECIPES[recipe_name], inputs[prefix], args, device, seed)
        name = prefix + recipe_name
        rows.append(r)
        print(
            f"{name:24s} {seed:4d} {r['kaggle_dice']:7.4f} {r['baseline']:6.4f} "
            f"{r['dice_defects']:7.4f} {r['pred_empty']:10.3f} "
            f"{r['final_train_loss']:6.3f} {r['seconds']:5.0f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
