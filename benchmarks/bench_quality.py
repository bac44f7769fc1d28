"""Model quality at equal wall-clock budget: steelseg's recipe (the paper's network) against
segmentation_models.pytorch's ``Unet(resnet18)`` trained in a plain PyTorch loop with the public
starter recipe, on held-out synthetic data in the Severstal layout.

    pip install -e ".[bench]"     # segmentation-models-pytorch, for the peer only
    python benchmarks/bench_quality.py --minutes 8 --seeds 3               # 64x320, 2-core CPU
    python benchmarks/bench_quality.py --height 256 --width 1600 --crop 256x800 --minutes 10

Each seed makes a training set and a test set of its own (synthetic seeds 1000 + 10 s and
1000 + 10 s + 1: seeds no recipe was chosen on) and trains every system from random weights for
the same number of minutes on this machine (no ImageNet weights: none can be downloaded here;
both encoders start equal in that). Scored on the whole test images: Kaggle mean Dice, per
class, presence precision and recall per class, and the all-empty baseline, per seed and as mean
and spread. Systems:

- ``steelseg-default``: ``TrainConfig()``'s recipe (AdamW, warm-up + cosine over the steps the
  budget allows, BCE + Dice, the head prior) on the paper's U-Net, with steelseg's augmentation
  (flips, brightness/contrast);
- ``smp-unet-resnet18``: ``smp.Unet("resnet18", encoder_weights=None, classes=4)``, Adam 5e-4,
  ``BCEWithLogitsLoss``, horizontal flips: the public Severstal starter kernels' recipe.
"""

import argparse
import time

import numpy as np
import torch
from bench_recipe import make_data
from common import record, table

from steelseg.config import TrainConfig
from steelseg.data import pipeline
from steelseg.domain import N_CLASSES
from steelseg.training import epoch, recipe


def steelseg_default(config: TrainConfig):
    """(model, loss, optimizer, scheduler factory, augment) of the default recipe."""
    model = recipe.build_model(config)
    optimizer = recipe.build_optimizer(config, model)

    def scheduler(total_steps: int):
        return recipe.build_scheduler(config, optimizer, total_steps)

    def augment(images, bits, rng):
        batch = {"image": images, "mask": bits, "image_id": np.arange(len(images))}
        out = pipeline.augment_batch(
            batch, config.crop_height, config.crop_width, int(rng.integers(2**31))
        )
        return out["image"], out["mask"]

    return model, recipe.build_loss(config), optimizer, scheduler, augment


def smp_unet_resnet18(config: TrainConfig):
    import segmentation_models_pytorch as smp

    model = smp.Unet("resnet18", encoder_weights=None, classes=N_CLASSES, activation=None)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)

    def scheduler(total_steps: int):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def augment(images, bits, rng):
        flip = rng.random(len(images)) < 0.5
        images, bits = images.copy(), bits.copy()
        images[flip], bits[flip] = images[flip, :, ::-1], bits[flip, :, ::-1]
        return images, bits

    return model, torch.nn.BCEWithLogitsLoss(), optimizer, scheduler, augment


SYSTEMS = {"steelseg-default": steelseg_default, "smp-unet-resnet18": smp_unet_resnet18}


class Budgeted:
    """Batches until ``seconds`` have passed since the first was asked for; the schedule's
    length is set from the pace of the first ``probe`` steps."""

    def __init__(self, make_batch, seconds: float, on_pace, probe: int = 3):
        self.make_batch, self.seconds = make_batch, seconds
        self.on_pace, self.probe = on_pace, probe
        self.steps = 0

    def __iter__(self):
        start = time.perf_counter()
        while time.perf_counter() - start < self.seconds:
            if self.steps == self.probe:
                per_step = (time.perf_counter() - start) / self.probe
                self.on_pace(self.probe + int((self.seconds - per_step * self.probe) / per_step))
            yield self.make_batch()
            self.steps += 1


def run(system: str, data, args, seed: int, device: torch.device) -> dict:
    train_images, train_bits, test_images, test_bits = data
    config = TrainConfig(batch_size=args.batch, crop_height=args.crop[0], crop_width=args.crop[1])
    torch.manual_seed(seed)
    model, loss_fn, optimizer, make_scheduler, augment = SYSTEMS[system](config)
    model.to(device)
    loss_fn.to(device)
    rng = np.random.default_rng(seed)
    scheduler_holder = {"scheduler": make_scheduler(10**6)}

    class Scheduler:  # the real one is made once the pace is known
        def step(self):
            scheduler_holder["scheduler"].step()

        @property
        def last_epoch(self):
            return scheduler_holder["scheduler"].last_epoch

    def on_pace(total_steps: int) -> None:
        done = scheduler_holder["scheduler"].last_epoch
        scheduler_holder["scheduler"] = make_scheduler(total_steps)
        recipe.move_schedule(scheduler_holder["scheduler"], done)

    def make_batch():
        idx = rng.integers(len(train_images), size=args.batch)
        images, bits = augment(train_images[idx], train_bits[idx], rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(images)),
                "mask": torch.from_numpy(np.ascontiguousarray(bits))}  # fmt: skip

    batches = Budgeted(make_batch, 60 * args.minutes, on_pace)
    amp = device.type == "cuda"
    epoch.train_one_epoch(model, batches, loss_fn, optimizer, Scheduler(), device, amp=amp)
    test = (
        {"image": torch.from_numpy(test_images[i : i + args.batch]),
         "mask": torch.from_numpy(test_bits[i : i + args.batch])}
        for i in range(0, len(test_images), args.batch)
    )  # fmt: skip
    _, _, counts, _ = epoch.validate_one_epoch(model, test, loss_fn, device, amp=amp)
    scores = counts.compute()
    return {
        "system": system,
        "seed": seed,
        "steps": batches.steps,
        "kaggle_dice": scores.kaggle_dice,
        "all_empty": scores.empty_baseline,
        **{f"dice_class_{c + 1}": scores.dice_per_class[c] for c in range(N_CLASSES)},
        **{f"presence_recall_{c + 1}": scores.presence_recall[c] for c in range(N_CLASSES)},
        **{f"presence_precision_{c + 1}": scores.presence_precision[c] for c in range(N_CLASSES)},
    }


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
                "steps": int(np.mean([r["steps"] for r in mine])),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--crop", default="", help="HxW training crop, e.g. 256x800")
    parser.add_argument("--train-images", type=int, default=320)
    parser.add_argument("--test-images", type=int, default=120)
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget a system")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--json", default="", help="a results file name (benchmarks/results/)")
    args = parser.parse_args()
    args.crop = tuple(int(v) for v in args.crop.split("x")) if args.crop else (0, 0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for seed in range(args.seeds):
        data_seed = 1000 + 10 * seed
        train = make_data(args.train_images, args.height, args.width, data_seed)
        test = make_data(args.test_images, args.height, args.width, data_seed + 1)
        for system in args.systems.split(","):
            row = run(system, (*train, *test), args, seed, device)
            rows.append(row)
            print(table([row], list(row)[:8]), flush=True)
    results = summary(rows)
    print(
        f"\n{args.height}x{args.width}, {args.train_images} training and {args.test_images} test "
        f"images a seed, {args.minutes:g} minutes a system on {device}:"
    )
    print(table(results, list(results[0])))
    if args.json:
        record(rows, args.json, summary=results, minutes=args.minutes)


if __name__ == "__main__":
    main()
