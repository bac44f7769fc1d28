"""One typed config for a training run. The command line, config files, the Tune search space and
checkpoints all speak it; an unknown key is an error, never silently ignored."""

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from steelseg.errors import SteelsegError
from steelseg.model.unet import ENCODER_STRIDE
from steelseg.paths import local_path

HELP = {
    "data": "Severstal-layout folder (train.csv, train_images/); empty: a synthetic demo set",
    "storage": "folder (or shared file system path) where runs are kept",
    "name": "the run; rerunning with the same storage and name resumes it",
    "modalities": "image folders stacked as channels, visible first, e.g. visible,ir",
    "drop_bad": "drop images with data problems (counted) instead of failing",
    "epochs": "passes over the training split",
    "batch_size": "images per batch on each worker",
    "grad_accum": "optimizer step every this many batches",
    "lr": "peak learning rate of AdamW",
    "weight_decay": "AdamW weight decay (not on biases and norms)",
    "warmup_steps": "optimizer steps of linear warm-up before the cosine decay",
    "bce_weight": "weight of BCE in the loss",
    "dice_weight": "weight of (1 - soft Dice) in the loss",
    "pos_weight": "BCE weight of defect pixels per class, 4 values",
    "head_prior": "initial defect probability the head predicts (its bias)",
    "pretrained": "encoder weights: '' (random), imagenet, or a resnet18 state_dict file",
    "crop_height": "training crop height, multiple of 32; 0: whole image",
    "crop_width": "training crop width, multiple of 32; 0: whole image",
    "val_fraction": "share of images in the validation split",
    "threshold": "probability above which a pixel counts as defect in val Dice",
    "seed": "seed of the split, shuffles, augmentation and initialisation",
    "num_workers": "Ray Train workers (DDP ranks)",
    "use_gpu": "one GPU per worker",
    "cpus_per_worker": "CPUs reserved per worker",
    "placement_strategy": "PACK workers on few nodes or SPREAD them over many",
    "amp": "bf16 autocast and channels_last on GPU",
    "max_failures": "worker failures to recover from, from the last checkpoint",
    "keep_checkpoints": "checkpoints kept, best by val Dice (the latest is kept too)",
    "log_images": "validation images in the TensorBoard figure each epoch",
    "synth_images": "images in the demo set (when data is empty)",
    "synth_height": "demo image height",
    "synth_width": "demo image width",
}


@dataclass
class TrainConfig:
    """A training run. Defaults are the recipe measured to learn from random weights
    (benchmarks/bench_recipe.py); the demo needs nothing else."""

    data: str = ""
    storage: str = "~/steelseg_runs"
    name: str = "demo"
    modalities: list[str] = field(default_factory=lambda: ["visible"])
    drop_bad: bool = False

    epochs: int = 8
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    # 1:1 collapsed to "no defect" from random weights at 64x320; see the README's recipe table
    bce_weight: float = 0.75
    dice_weight: float = 0.25
    pos_weight: list[float] | None = None
    head_prior: float = 0.01
    pretrained: str = ""
    crop_height: int = 0
    crop_width: int = 0
    val_fraction: float = 0.2
    threshold: float = 0.5
    seed: int = 0

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    amp: bool = True
    max_failures: int = 2
    keep_checkpoints: int = 3
    log_images: int = 4
    synth_images: int = 320
    synth_height: int = 32
    synth_width: int = 160

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = (
            "epochs", "batch_size", "grad_accum", "num_workers", "synth_images", "keep_checkpoints"
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise SteelsegError(f"config {name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "max_failures", "log_images"):
            if getattr(self, name) < 0:
                raise SteelsegError(f"config {name} must be >= 0, got {getattr(self, name)}")
        if self.cpus_per_worker <= 0:
            raise SteelsegError(
                f"config cpus_per_worker must be positive, got {self.cpus_per_worker}"
            )
        if self.lr <= 0:
            raise SteelsegError(f"config lr must be positive, got {self.lr}")
        if self.bce_weight < 0 or self.dice_weight < 0 or self.bce_weight + self.dice_weight == 0:
            raise SteelsegError(
                f"config bce_weight and dice_weight must be >= 0 and not both 0, "
                f"got {self.bce_weight} and {self.dice_weight}"
            )
        for name in ("crop_height", "crop_width", "synth_height", "synth_width"):
            value = getattr(self, name)
            if value % ENCODER_STRIDE or value < 0:
                raise SteelsegError(
                    f"config {name} must be a multiple of {ENCODER_STRIDE}, got {value}"
                )
        if bool(self.crop_height) != bool(self.crop_width):
            raise SteelsegError("config crop_height and crop_width must both be set or both be 0")
        if not 0 < self.head_prior < 1:
            raise SteelsegError(f"config head_prior must be in (0, 1), got {self.head_prior}")
        if not 0 < self.val_fraction < 1:
            raise SteelsegError(f"config val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.modalities or self.modalities[0] != "visible":
            raise SteelsegError(
                f"config modalities must start with 'visible', got {self.modalities}"
            )
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise SteelsegError(
                f"config placement_strategy must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, "
                f"got {self.placement_strategy!r}"
            )
        for name in ("data", "storage", "pretrained"):
            local_path(getattr(self, name), f"config {name}")
        if self.pos_weight is not None and len(self.pos_weight) != 4:
            raise SteelsegError(f"config pos_weight needs 4 values, got {self.pos_weight}")

    @property
    def storage_path(self) -> str:
        return str(Path(os.path.expanduser(self.storage)).resolve())

    @property
    def run_dir(self) -> Path:
        return Path(self.storage_path) / self.name

    def resolved(self) -> "TrainConfig":
        """A copy whose data and weights paths are absolute, as workers on other nodes (or with
        another working directory) need them."""
        pretrained = self.pretrained
        if pretrained and pretrained != "imagenet":
            pretrained = str(Path(os.path.expanduser(pretrained)).resolve())
        data = str(Path(os.path.expanduser(self.data)).resolve()) if self.data else ""
        return self.replace(data=data, pretrained=pretrained, storage=self.storage_path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Raises SteelsegError naming any unknown key and the source it came from."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SteelsegError(f"{source}: unknown config key(s) {', '.join(unknown)}")
        defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
        return cls(**{k: _check_type(k, v, defaults[k], source) for k, v in values.items()})

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default_factory is dataclasses.MISSING else f.default_factory()


def _check_type(key: str, value: Any, default: Any, source: str) -> Any:
    """The value, as the field's type (an int where a float is expected is fine); a list's
    elements are checked too."""
    if key == "pos_weight" and value is None:
        return value
    expected = type(default) if default is not None else list
    if expected is list:
        if not isinstance(value, list | tuple):
            raise SteelsegError(f"{source}: config {key} must be a list, got {value!r}")
        return [_check_type(key, v, LIST_ELEMENT[key](), source) for v in value]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise SteelsegError(f"{source}: config {key} must be {expected.__name__}, got {value!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per config field (``--batch-size``; ``--use-gpu/--no-use-gpu`` for booleans,
    comma lists for lists) and ``--config FILE``; flags override the file."""
    parser.add_argument("--config", help="YAML or JSON file of config keys")
    for f in dataclasses.fields(TrainConfig):
        default = _default(f)
        flag = "--" + f.name.replace("_", "-")
        text = f"{HELP[f.name]} (default: {_show(default)})"
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=text,
            )
        else:
            kind = _parse_list if f.name in LIST_ELEMENT else type(default)
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=argparse.SUPPRESS,
                help=text,
                metavar=f.name.upper(),
            )


LIST_ELEMENT = {"modalities": str, "pos_weight": float}


def _parse_list(text: str) -> list:
    return [v.strip() for v in text.split(",") if v.strip()]


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return repr(value) if value == "" else str(value)


def from_args(args: argparse.Namespace) -> TrainConfig:
    """The config from ``--config FILE`` (if any) overridden by the flags given."""
    values = read_config_file(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k in HELP}
    if "pos_weight" in flags:
        flags["pos_weight"] = _floats(flags["pos_weight"], "--pos-weight")
    return TrainConfig.from_dict({**values, **flags}, args.config or "command line")


def _floats(values: list[str], flag: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        raise SteelsegError(f"{flag}: expected comma-separated numbers, got {values}") from None


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML or JSON mapping of config keys (not yet checked against TrainConfig)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SteelsegError(f"{path}: cannot read config ({e.strerror})") from None
    try:
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())
        raise SteelsegError(
            f"{path}: not valid {path.suffix.lstrip('.') or 'YAML'} ({reason})"
        ) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SteelsegError(
            f"{path}: expected a mapping of config keys, got {type(values).__name__}"
        )
    return values
