"""Model quality at equal wall-clock budget: steelseg's recipes (the paper's network, its levers,
smp networks trained with steelseg's recipe) against segmentation_models.pytorch's
``Unet(resnet18)`` trained in a plain PyTorch loop with the public starter recipe, on held-out
synthetic data in the Severstal layout.

    pip install -c constraints.txt -e ".[smp]"   # segmentation-models-pytorch
    python benchmarks/bench_quality.py --minutes 8 --seeds 3               # 64x320, 2-core CPU
    python benchmarks/bench_quality.py --height 256 --width 1600 --crop 256x800 --minutes 0.5
    python benchmarks/bench_quality.py --systems steelseg-unet-resnet18+levers --steps 240 \
        --precision both                  # bf16 against float32 for the same images

Each seed makes a training set, a calibration set and a test set of its own (synthetic seeds
1000 + 10 s, + 1 and + 2: seeds no recipe was chosen on) and trains every system from random
weights for the same wall-clock time on this machine (no ImageNet weights: none can be
downloaded here; all encoders start equal in that). Batches are made by a pool of threads
ahead of the training step, the same for every system. Each model is scored on the whole test
images twice: with threshold 0.5, and with the post-processing rules ``steelseg calibrate``
would find, searched on the calibration set (row ``... +calibration``). Reported: Kaggle mean
Dice, per class, presence precision and recall per class, the presence AUC per class (how well
an image's highest probability ranks the class's presence, whatever the threshold), the all-empty
baseline, per seed and as mean and spread.

Precision (``--precision``) follows ``steelseg train``'s ``--amp``: bf16 autocast where the device
runs it fast (CUDA, a CPU with avx512_bf16 or AMX: ``inputs.autocast_dtype``), float32 with
``fp32``; ``both`` trains every system twice from the same seed, once each way, and also scores
each model's forward in the other precision (rows ``... [fp32]``, ``... [bf16]``; the agreement of
the two forwards' masks after the rules is reported as pixels differing and the Dice between
them). ``--steps`` trains for a number of steps (the same images for every system) instead of a
wall-clock budget. Systems (``--systems``, comma-separated):

- ``smp-unet-resnet18``: the peer. ``smp.Unet("resnet18", encoder_weights=None, classes=4)``,
  Adam 5e-4, ``BCEWithLogitsLoss``, horizontal flips, the same random crop: the public Severstal
  starter kernels' recipe in a plain loop;
- ``steelseg-default``: ``TrainConfig()``'s recipe (AdamW, warm-up + cosine over the steps the
  budget allows, BCE + Dice, the head prior) on the paper's U-Net, steelseg's augmentation;
- the same with a lever or several (``LEVERS``): ``+defect-crops`` (half the crops on defects),
  ``+presence`` (the image-level presence head as a gate), ``+levers`` (both),
  ``steelseg-unet-resnet18+levers`` (smp's U-Net under steelseg's recipe and levers) and
  ``...+rare`` (images of classes on fewer than 10% of the images drawn more often),
  ``+batch-dice`` (soft Dice per class over the batch instead of per image and class).
"""

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import Pool

import numpy as np
import torch
from bench_recipe import crop_and_flip, make_data
from common import record, table

from steelseg.config import TrainConfig
from steelseg.data.augment import augment_batch
from steelseg.data.sampling import rare_repeats
from steelseg.domain import N_CLASSES
from steelseg.evaluation.metrics import DiceCounts
from steelseg.inference.postprocess import Calibration, ImageStats, image_stats
from steelseg.model.inputs import (
    autocast,
    autocast_dtype,
    forward_padded,
    prefers_channels_last,
    to_inputs,
)
from steelseg.training import epoch, recipe

LEVERS = {
    "steelseg-default": {},
    "steelseg+defect-crops": {"defect_crops": 0.5},
    "steelseg+presence": {"presence_head": True},
    "steelseg+levers": {"defect_crops": 0.5, "presence_head": True},
    "steelseg+batch-dice": {"dice_over": "batch"},
    "steelseg+levers+batch-dice": {
        "defect_crops": 0.5,
        "presence_head": True,
        "dice_over": "batch",
    },
    "steelseg-unet-resnet18": {"arch": "unet-resnet18"},
    "steelseg-unet-resnet18+levers": {
        "arch": "unet-resnet18",
        "defect_crops": 0.5,
        "presence_head": True,
    },
    "steelseg-unet-resnet18+levers+rare": {
        "arch": "unet-resnet18",
        "defect_crops": 0.5,
        "presence_head": True,
        "rare_share": 0.1,
    },
    "steelseg-unet-resnet18+levers+batch-dice": {
        "arch": "unet-resnet18",
        "defect_crops": 0.5,
        "presence_head": True,
        "dice_over": "batch",
    },
    "steelseg-unet-resnet18+levers+batch-dice+rare": {
        "arch": "unet-resnet18",
        "defect_crops": 0.5,
        "presence_head": True,
        "dice_over": "batch",
        "rare_share": 0.1,
    },
}
PEER = "smp-unet-resnet18"
DEFAULT_SYSTEMS = (
    PEER,
    "steelseg-default",
    "steelseg+defect-crops",
    "steelseg+presence",
    "steelseg-unet-resnet18+levers",
)


def steelseg_system(config: TrainConfig):
    """(model, loss, optimizer, scheduler factory, augment) of steelseg's recipe."""
    model = recipe.build_model(config)
    optimizer = recipe.build_optimizer(config, model)

    def scheduler(total_steps: int):
        return recipe.build_scheduler(config, optimizer, total_steps)

    def augment(images, bits, rng):
        batch = {"image": images, "mask": bits, "image_id": np.arange(len(images))}
        seed = int(rng.integers(2**31))
        out = augment_batch(batch, config.crop_height, config.crop_width, seed, config.defect_crops)
        return out["image"], out["mask"]

    return model, recipe.build_loss(config), optimizer, scheduler, augment


def peer_system(config: TrainConfig):
    import segmentation_models_pytorch as smp

    model = smp.Unet("resnet18", encoder_weights=None, classes=N_CLASSES, activation=None)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)

    def scheduler(total_steps: int):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    crop = (config.crop_height, config.crop_width) if config.crop_height else None

    def augment(images, bits, rng):
        return crop_and_flip(rng, images, bits, crop)

    return model, torch.nn.BCEWithLogitsLoss(), optimizer, scheduler, augment


def system_config(system: str, config: TrainConfig) -> TrainConfig:
    return config if system == PEER else config.replace(**LEVERS[system])


def build_system(system: str, config: TrainConfig):
    if system == PEER:
        return peer_system(config)
    return steelseg_system(system_config(system, config))


def image_weights(bits: np.ndarray, rare_share: float) -> np.ndarray | None:
    """Sampling probabilities of the training images: ``sampling.rare_repeats``, normalised
    (None: uniform)."""
    if not rare_share:
        return None
    presence = np.stack([((bits >> c) & 1).reshape(len(bits), -1).any(axis=1)
                         for c in range(N_CLASSES)], axis=1)  # fmt: skip
    repeats = rare_repeats(presence, rare_share)
    return repeats / repeats.sum()


class Budgeted:
    """Batches until ``seconds`` have passed since the first was asked for (or ``steps`` batches,
    when given), made ``ahead`` at a time by a pool of threads (each from its own seeded
    generator); the schedule's length is set from the pace of the first ``probe`` steps, or is
    ``steps``."""

    def __init__(self, make_batch, seconds: float, on_pace, probe: int = 5, ahead: int = 8,
                 steps: int = 0):  # fmt: skip
        self.make_batch, self.seconds, self.limit = make_batch, seconds, steps
        self.on_pace, self.probe, self.ahead = on_pace, probe, ahead
        self.steps = 0
        if steps:
            on_pace(steps)

    def more(self, start: float) -> bool:
        if self.limit:
            return self.steps < self.limit
        return time.perf_counter() - start < self.seconds

    def __iter__(self):
        with ThreadPoolExecutor(self.ahead) as pool:
            queue = [pool.submit(self.make_batch, i) for i in range(self.ahead)]
            start = time.perf_counter()
            while self.more(start):
                if self.steps == self.probe and not self.limit:
                    per_step = (time.perf_counter() - start) / self.probe
                    self.on_pace(
                        self.probe + int((self.seconds - per_step * self.probe) / per_step)
                    )
                batch = queue.pop(0).result()
                queue.append(pool.submit(self.make_batch, self.steps + self.ahead))
                yield batch
                self.steps += 1
            for future in queue:
                future.cancel()


def train(system: str, data, args, seed: int, device: torch.device, amp: bool):
    train_images, train_bits = data
    config = TrainConfig(batch_size=args.batch, crop_height=args.crop[0], crop_width=args.crop[1])
    torch.manual_seed(seed)
    model, loss_fn, optimizer, make_scheduler, augment = build_system(system, config)
    layout = torch.channels_last if prefers_channels_last(device, amp) else torch.contiguous_format
    model.to(device, memory_format=layout)  # precision and layout alike for every system
    loss_fn.to(device)
    weights = image_weights(train_bits, system_config(system, config).rare_share)
    holder = {"scheduler": make_scheduler(10**6)}

    class Scheduler:  # the real one is made once the pace is known
        def step(self):
            holder["scheduler"].step()

    def on_pace(total_steps: int) -> None:
        done = holder["scheduler"].last_epoch
        holder["scheduler"] = make_scheduler(total_steps)
        recipe.move_schedule(holder["scheduler"], done)

    def make_batch(i: int):
        rng = np.random.default_rng([seed, i])
        if weights is None:  # as the recorded runs drew them
            idx = rng.integers(len(train_images), size=args.batch)
        else:
            idx = rng.choice(len(train_images), size=args.batch, p=weights)
        images, bits = augment(train_images[idx], train_bits[idx], rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(images)),
                "mask": torch.from_numpy(np.ascontiguousarray(bits))}  # fmt: skip

    batches = Budgeted(make_batch, 60 * args.minutes, on_pace, steps=args.steps)
    epoch.train_one_epoch(model, batches, loss_fn, optimizer, Scheduler(), device, amp=amp)
    return model, batches.steps


@torch.no_grad()
def probabilities(model, images, bits, batch_size: int, device: torch.device, amp: bool):
    """(probabilities (B, 4, H, W) on the device, truth (B, 4, H, W) bool) a batch."""
    model.eval()
    channels_last = prefers_channels_last(device, amp)
    for i in range(0, len(images), batch_size):
        batch = {"image": torch.from_numpy(images[i : i + batch_size]),
                 "mask": torch.from_numpy(bits[i : i + batch_size])}  # fmt: skip
        x, y = to_inputs(batch, device, channels_last=channels_last)
        with autocast(device, amp):
            logits = forward_padded(model, x)
        yield torch.sigmoid(logits.float()), y.bool()


def _image_stats(pair) -> ImageStats:
    return image_stats(pair[0].astype(np.float32), pair[1])


def calibrate(model, images, bits, args, device, amp: bool, pool: Pool):
    """The rules ``steelseg calibrate`` would find, on these images (the search's per-image
    work spread over the CPUs)."""
    search = Calibration()
    for probs, truth in probabilities(model, images, bits, args.batch, device, amp):
        pairs = zip(probs.half().cpu().numpy(), truth.cpu().numpy().astype(np.uint8))
        for stats in pool.map(_image_stats, pairs):
            search.add_stats(stats)
    return search.result()[0]


def presence_auc(scores: np.ndarray, present: np.ndarray) -> float:
    """The chance that an image with the class scores above one without it (ties half): how
    well the image's highest probability ranks the class's presence, whatever the threshold."""
    pos, neg = scores[present], scores[~present]
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] > neg).mean() + 0.5 * (pos[:, None] == neg).mean())


def score(model, images, bits, rules, args, device, amp: bool):
    """Plain and calibrated Dice counts, the presence AUC per class, and the masks after the
    rules (B, 4, H, W) bool."""
    plain, calibrated = DiceCounts(N_CLASSES, device), DiceCounts(N_CLASSES)
    highest, present, kept = [], [], []
    for probs, truth in probabilities(model, images, bits, args.batch, device, amp):
        plain.update(probs > 0.5, truth)
        masks, _ = rules.apply_batch(probs)
        kept.append(masks.astype(bool))
        calibrated.update(torch.from_numpy(masks).bool(), truth.cpu())
        highest.append(probs.flatten(2).amax(-1).cpu().numpy())
        present.append(truth.flatten(2).any(-1).cpu().numpy())
    highest, present = np.concatenate(highest), np.concatenate(present)
    auc = [presence_auc(highest[:, c], present[:, c]) for c in range(N_CLASSES)]
    return plain.compute(), calibrated.compute(), auc, np.concatenate(kept)


AGREEMENT = ("kaggle_dice_other_forward", "pixels_differing", "dice_between")


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """How closely two forwards' masks after the rules agree: the share of pixels (of all
    images and classes) that differ, and the Dice between them over all pixels (1 where both
    are empty)."""
    both, either = (a & b).sum(), a.sum() + b.sum()
    return {"pixels_differing": float((a != b).mean()),
            "dice_between": float(2 * both / either) if either else 1.0}  # fmt: skip


def as_row(system: str, seed: int, steps: int, scores, auc: list[float]) -> dict:
    return {
        "system": system,
        "seed": seed,
        "steps": steps,
        "kaggle_dice": scores.kaggle_dice,
        "all_empty": scores.empty_baseline,
        **{f"dice_class_{c + 1}": scores.dice_per_class[c] for c in range(N_CLASSES)},
        **{f"presence_recall_{c + 1}": scores.presence_recall[c] for c in range(N_CLASSES)},
        **{f"presence_precision_{c + 1}": scores.presence_precision[c] for c in range(N_CLASSES)},
        **{f"presence_auc_{c + 1}": auc[c] for c in range(N_CLASSES)},
    }


def run(system: str, data: dict, args, seed: int, device, pool, amp: bool, tag: str = ""):
    """A system trained and scored with ``amp`` (rows named ``system + tag``); with a tag, the
    model's forward in the other precision is scored too, with the same rules, and the two
    forwards' masks compared."""
    start = time.perf_counter()
    model, steps = train(system, data["train"], args, seed, device, amp)
    seconds = round(time.perf_counter() - start, 1)
    rules = calibrate(model, *data["calibration"], args, device, amp, pool)
    plain, calibrated, auc, masks = score(model, *data["test"], rules, args, device, amp)
    name = system + tag
    rows = [
        as_row(name, seed, steps, plain, auc),
        as_row(f"{name} +calibration", seed, steps, calibrated, auc),
    ]
    for row in rows:
        row["train_seconds"] = seconds
        row["seconds"] = round(time.perf_counter() - start, 1)
    if tag:
        other = not amp
        _, other_calibrated, _, other_masks = score(
            model, *data["test"], rules, args, device, other
        )
        rows[1]["kaggle_dice_other_forward"] = other_calibrated.kaggle_dice
        rows[1].update(agreement(masks, other_masks))
    return rows


def mean(values) -> float:
    """The mean of the values that are numbers (a class absent from a test set has none)."""
    numbers = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(numbers)) if numbers else float("nan")


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for system in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == system]
        kaggle = np.array([r["kaggle_dice"] for r in mine])
        out.append(
            {
                "system": system,
                "seeds": len(mine),
                "kaggle_mean": float(kaggle.mean()),
                "kaggle_sd": float(kaggle.std(ddof=1)) if len(mine) > 1 else 0.0,
                "all_empty": float(np.mean([r["all_empty"] for r in mine])),
                **{
                    f"class_{c}": mean(r[f"dice_class_{c}"] for r in mine)
                    for c in range(1, N_CLASSES + 1)
                },
                **{f"recall_{c}": mean(r[f"presence_recall_{c}"] for r in mine) for c in (1, 2)},
                **{f"auc_{c}": mean(r[f"presence_auc_{c}"] for r in mine) for c in (1, 2)},
                "steps": int(np.mean([r["steps"] for r in mine])),
                "train_seconds": mean(r["train_seconds"] for r in mine),
                **{key: mean(r[key] for r in mine) for key in AGREEMENT if key in mine[0]},
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--crop", default="", help="HxW training crop, e.g. 256x800")
    parser.add_argument("--train-images", type=int, default=320)
    parser.add_argument("--calibration-images", type=int, default=80)
    parser.add_argument("--test-images", type=int, default=120)
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget a system")
    parser.add_argument("--steps", type=int, default=0,
                        help="train this many steps instead of for --minutes")  # fmt: skip
    parser.add_argument("--precision", choices=("auto", "fp32", "both"), default="auto",
                        help="auto: bf16 where the device runs it fast, as steelseg train --amp; "
                        "both: each system in fp32 and in bf16")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS))
    parser.add_argument("--json", default="", help="a results file name (benchmarks/results/)")
    args = parser.parse_args()
    args.crop = tuple(int(v) for v in args.crop.split("x")) if args.crop else (0, 0)
    systems = args.systems.split(",")
    unknown = [s for s in systems if s != PEER and s not in LEVERS]
    if unknown:
        parser.error(f"unknown system(s) {', '.join(unknown)}; known: {PEER}, {', '.join(LEVERS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision == "both" and autocast_dtype(device, True) is None:
        parser.error(f"--precision both: {device} has no fast bf16 (inputs.autocast_dtype)")
    precisions = {"auto": [(True, "")], "fp32": [(False, "")],
                  "both": [(False, " [fp32]"), (True, " [bf16]")]}[args.precision]  # fmt: skip
    rows = []
    with Pool() as pool:
        for seed in range(args.seeds):
            data_seed = 1000 + 10 * seed
            sizes = {"train": args.train_images, "calibration": args.calibration_images,
                     "test": args.test_images}  # fmt: skip
            data = {
                part: make_data(n, args.height, args.width, data_seed + k)
                for k, (part, n) in enumerate(sizes.items())
            }
            for system in systems:
                for amp, tag in precisions:
                    new = run(system, data, args, seed, device, pool, amp, tag)
                    rows += new
                    shown = [*list(new[0])[:9], "presence_auc_1", "train_seconds"]
                    shown += [k for k in AGREEMENT if k in new[1]]
                    print(table(new, shown), flush=True)
                    if args.json:  # after every run: a run cut short keeps what it measured
                        record(rows, args.json, summary=summary(rows), minutes=args.minutes,
                               steps=args.steps, precision=args.precision)  # fmt: skip
    results = summary(rows)
    print(
        f"\n{args.height}x{args.width}, crop {args.crop}, {args.train_images} training, "
        f"{args.calibration_images} calibration and {args.test_images} test images a seed, "
        + (f"{args.steps} steps" if args.steps else f"{args.minutes:g} minutes")
        + f" a system on {device}, precision {args.precision}:"
    )
    print(table(results, list(results[0])))


if __name__ == "__main__":
    main()
