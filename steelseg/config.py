"""One typed config for a training run, defined once: each field carries its type, default, help
and group, and every check a user's value must pass is in ``TrainConfig.validate``. The command
line (a flag per field, derived from the annotations), config files, the Tune search space and
checkpoints all speak it; an unknown key is an error, never silently ignored.

The groups follow the Ray objects they feed: ``run`` (RunConfig: where the run lives, failures,
checkpoints), ``data`` (the data set and the Ray Data pipelines), ``recipe`` (the training loop)
and ``scaling`` (ScalingConfig).
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import posixpath
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from steelseg.domain import ENCODER_STRIDE, N_CLASSES
from steelseg.errors import SteelsegError
from steelseg.storage import Location, check_uri, locate

GROUPS = {
    "data": "the data set and its pipelines (Ray Data)",
    "recipe": "the training recipe",
    "scaling": "workers and their resources (Ray's ScalingConfig)",
    "run": "where the run lives, failures and checkpoints (Ray's RunConfig)",
}
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
DICE_OVER = ("pair", "batch")
# `steelseg tune`'s search space when no --search-space is given: config key -> {sampler: args}
DEFAULT_SPACE = {
    "lr": {"loguniform": [1e-4, 3e-3]},
    "bce_weight": {"uniform": [0.25, 1.0]},
    "dice_weight": {"uniform": [0.0, 1.0]},
}


def setting(default: Any, help: str, group: str) -> Any:
    """A config field: its default, its help text and its group (a list default is copied for
    each config)."""
    metadata = {"help": help, "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """A training run. Defaults are the recipe measured to learn from random weights
    (benchmarks/bench_recipe.py); the demo needs nothing else."""

    storage: str = setting(
        "~/steelseg_runs",
        "where runs are kept: a folder (shared by every node), s3://bucket/path or gs://...",
        "run",
    )
    name: str = setting(
        "demo", "the run; rerunning with the same storage and name resumes it", "run"
    )
    max_failures: int = setting(
        2, "worker failures to recover from, from the last checkpoint", "run"
    )
    keep_checkpoints: int = setting(
        3, "checkpoints kept, best by val Dice (the latest is kept too)", "run"
    )
    log_images: int = setting(4, "validation images in the TensorBoard figure each epoch", "run")
    calibrate: bool = setting(
        True,
        "at the end, search the best checkpoint's post-processing on the validation split "
        "(prediction then uses it; steelseg calibrate does it again, e.g. with TTA)",
        "run",
    )
    checkpoint_upload: str = setting(
        "async", "async: train on while a checkpoint uploads; sync: wait for it", "run"
    )

    data: str = setting(
        "",
        "Severstal-layout folder (train.csv, train_images/); empty: a synthetic demo set",
        "data",
    )
    modalities: list[str] = setting(
        ["visible"], "image folders stacked as channels, visible first, e.g. visible,ir", "data"
    )
    drop_bad: bool = setting(
        False, "drop images with data problems (counted) instead of failing", "data"
    )
    crop_height: int = setting(0, "training crop height, multiple of 32; 0: whole image", "data")
    crop_width: int = setting(0, "training crop width, multiple of 32; 0: whole image", "data")
    defect_crops: float = setting(
        0.0,
        "share of training crops placed on defect pixels when the image has any (0: uniform)",
        "data",
    )
    rare_share: float = setting(
        0.0,
        "each epoch, images of a class on fewer than this share of the N training images are "
        "repeated until the class is on share x N images (0: every image once)",
        "data",
    )
    val_fraction: float = setting(0.2, "share of images in the validation split", "data")
    synth_images: int = setting(320, "images in the demo set (when data is empty)", "data")
    synth_height: int = setting(32, "demo image height", "data")
    synth_width: int = setting(160, "demo image width", "data")

    arch: str = setting(
        "paper",
        "the network: paper (the paper's ResNet18 U-Net) or DECODER-ENCODER from "
        "segmentation_models.pytorch, e.g. unet-resnet34, fpn-resnet34 (pip install "
        "segmentation-models-pytorch)",
        "recipe",
    )
    presence_head: bool = setting(
        False,
        "an image-level head: per-class presence logits from the deepest features, trained "
        "jointly; at prediction a pixel's probability is multiplied by its class's presence",
        "recipe",
    )
    presence_weight: float = setting(0.5, "weight of the presence head's BCE in the loss", "recipe")
    epochs: int = setting(8, "passes over the training split", "recipe")
    max_steps: int = setting(
        0,
        "stop after this many optimizer steps, or at the end of epochs if that comes first (0: "
        "no limit): the run validates, checkpoints and calibrates there as at an epoch's end, "
        "and the schedule spans these steps; the smoke-test and benchmark lever",
        "recipe",
    )
    batch_size: int = setting(4, "images per batch on each worker", "recipe")
    grad_accum: int = setting(1, "optimizer step every this many batches", "recipe")
    lr: float = setting(1e-3, "peak learning rate of AdamW", "recipe")
    weight_decay: float = setting(1e-4, "AdamW weight decay (not on biases and norms)", "recipe")
    warmup_steps: int = setting(
        50, "optimizer steps of linear warm-up before the cosine decay", "recipe"
    )
    # 1:1 collapsed to "no defect" from random weights at 64x320 (docs/quality.md, the recipe table)
    bce_weight: float = setting(0.75, "weight of BCE in the loss", "recipe")
    dice_weight: float = setting(0.25, "weight of (1 - soft Dice) in the loss", "recipe")
    dice_over: str = setting(
        "pair",
        "soft Dice per (image, class) pair (pair) or per class over the batch (batch, as smp's "
        "DiceLoss): with pair, every clean image of a rare class pulls it towards never",
        "recipe",
    )
    pos_weight: list[float] | None = setting(
        None, "BCE weight of defect pixels per class, 4 values", "recipe"
    )
    head_prior: float = setting(
        0.01, "initial defect probability the head predicts (its bias)", "recipe"
    )
    pretrained: str = setting(
        "", "encoder weights: '' (random), imagenet, or a resnet18 state_dict file", "recipe"
    )
    threshold: float = setting(
        0.5, "probability above which a pixel counts as defect in val Dice", "recipe"
    )
    sync_bn: bool = setting(
        False,
        "SyncBatchNorm: BatchNorm statistics over every rank's batch, for small batches per GPU "
        "(needs use_gpu)",
        "recipe",
    )
    seed: int = setting(0, "seed of the split, shuffles, augmentation and initialisation", "recipe")
    amp: bool = setting(
        True,
        "bf16 autocast where the device runs it fast (CUDA, or a CPU with avx512_bf16/AMX) "
        "and channels_last; training, validation, calibration and prediction",
        "recipe",
    )

    num_workers: int = setting(
        2, "Ray Train workers (DDP ranks); MIN..MAX (e.g. 1..4) for elastic training", "scaling"
    )
    min_workers: int = setting(
        0,
        "elastic training: the fewest workers the run goes on with when nodes go away, growing "
        "back to num_workers when they return (0: always num_workers)",
        "scaling",
    )
    use_gpu: bool = setting(False, "one GPU per worker", "scaling")
    cpus_per_worker: float = setting(1.0, "CPUs reserved per worker", "scaling")
    placement_strategy: str = setting(
        "PACK", "PACK workers on few nodes or SPREAD them over many", "scaling"
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every check of the values; raises SteelsegError naming the field and the value."""
        self._check_finite()
        at_least = {
            1: (
                "epochs",
                "batch_size",
                "grad_accum",
                "num_workers",
                "synth_images",
                "keep_checkpoints",
            ),
            0: ("warmup_steps", "max_failures", "log_images", "max_steps"),
        }
        for low, names in at_least.items():
            for name in names:
                if getattr(self, name) < low:
                    rule = "must be at least 1" if low else "must be >= 0"
                    _bad(name, rule, getattr(self, name))
        if not 0 <= self.min_workers <= self.num_workers:
            _bad("min_workers", f"must be in 0..num_workers ({self.num_workers})", self.min_workers)
        for name in ("cpus_per_worker", "lr"):
            if getattr(self, name) <= 0:
                _bad(name, "must be positive", getattr(self, name))
        if self.weight_decay < 0:
            _bad("weight_decay", "must be >= 0", self.weight_decay)
        if self.bce_weight < 0 or self.dice_weight < 0 or self.bce_weight + self.dice_weight == 0:
            raise SteelsegError(
                f"config bce_weight and dice_weight must be >= 0 and not both 0, "
                f"got {self.bce_weight} and {self.dice_weight}"
            )
        for name in ("crop_height", "crop_width", "synth_height", "synth_width"):
            if getattr(self, name) % ENCODER_STRIDE or getattr(self, name) < 0:
                _bad(name, f"must be a multiple of {ENCODER_STRIDE}", getattr(self, name))
        if bool(self.crop_height) != bool(self.crop_width):
            raise SteelsegError("config crop_height and crop_width must both be set or both be 0")
        if not 0 <= self.rare_share < 1:
            _bad("rare_share", "must be in [0, 1)", self.rare_share)
        if not 0 <= self.defect_crops <= 1:
            _bad("defect_crops", "must be in [0, 1]", self.defect_crops)
        if self.presence_weight <= 0:  # an untrained head would gate at random
            _bad("presence_weight", "must be positive", self.presence_weight)
        check_arch(self.arch)
        if self.arch != "paper" and self.pretrained not in ("", "imagenet"):
            _bad("pretrained", f"must be '' or imagenet with arch {self.arch}", self.pretrained)
        for name in ("head_prior", "val_fraction", "threshold"):
            if not 0 < getattr(self, name) < 1:
                _bad(name, "must be in (0, 1)", getattr(self, name))
        if not self.modalities or self.modalities[0] != "visible":
            _bad("modalities", "must start with 'visible'", self.modalities)
        if self.checkpoint_upload not in ("async", "sync"):
            _bad("checkpoint_upload", "must be async or sync", self.checkpoint_upload)
        if self.dice_over not in DICE_OVER:
            _bad("dice_over", f"must be {' or '.join(DICE_OVER)}", self.dice_over)
        if self.sync_bn and not self.use_gpu:  # torch's SyncBatchNorm runs on GPUs only
            _bad("sync_bn", "needs use_gpu", self.sync_bn)
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            _bad(
                "placement_strategy",
                f"must be {' or '.join(PLACEMENT_STRATEGIES)}",
                self.placement_strategy,
            )
        for name in ("data", "pretrained", "storage"):
            check_uri(getattr(self, name), f"config {name}")
        if self.pos_weight is not None and len(self.pos_weight) != N_CLASSES:
            _bad("pos_weight", f"needs {N_CLASSES} values", self.pos_weight)
        if self.pos_weight is not None and min(self.pos_weight) <= 0:
            _bad("pos_weight", "must be positive", self.pos_weight)

    def _check_finite(self) -> None:
        # first: NaN fails no comparison, so every range check below would let it through
        for name in FIELDS:
            value = getattr(self, name)
            numbers = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                _bad(name, "must be a finite number", value)

    @property
    def workers(self) -> int | tuple[int, int]:
        """Ray Train's ``num_workers``: a number, or (min, max) for elastic training."""
        if self.min_workers and self.min_workers < self.num_workers:
            return (self.min_workers, self.num_workers)
        return self.num_workers

    @property
    def storage_path(self) -> str:
        """The storage folder: an absolute local path, or the URI (with its endpoint)."""
        return locate(self.storage, "config storage").target

    @property
    def run_dir(self) -> Location:
        return locate(self.storage, "config storage") / self.name

    def resolved(self) -> "TrainConfig":
        """A copy whose paths are absolute and whose storage URI carries its endpoint, as
        workers on other nodes (or with another working directory) need them."""
        pretrained = self.pretrained
        if pretrained and pretrained != "imagenet":
            pretrained = locate(pretrained, "config pretrained").target
        data = locate(self.data, "config data").target if self.data else ""
        return self.replace(data=data, pretrained=pretrained, storage=self.storage_path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "") -> "TrainConfig":
        """Raises SteelsegError naming any unknown key, or a value of the wrong type, and the
        source it came from (when given)."""
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise SteelsegError(f"{_at(source)}unknown config key(s) {', '.join(unknown)}")
        values = _worker_range(values, source)
        return cls(**{k: coerce(k, v, source) for k, v in values.items()})

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _worker_range(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``num_workers: MIN..MAX`` (elastic) as ``min_workers`` and ``num_workers``."""
    workers = values.get("num_workers")
    if not (isinstance(workers, str) and ".." in workers):
        return values
    low_text, _, high_text = workers.partition("..")
    try:
        low, high = int(low_text), int(high_text)
    except ValueError:
        raise SteelsegError(
            f"{_at(source)}config num_workers must be a number or MIN..MAX, got {workers!r}"
        ) from None
    if not 1 <= low <= high:
        raise SteelsegError(f"{_at(source)}config num_workers {workers}: need 1 <= MIN <= MAX")
    return {**values, "min_workers": low, "num_workers": high}


SMP_DECODERS = {
    "unet": "Unet",
    "unetplusplus": "UnetPlusPlus",
    "fpn": "FPN",
    "linknet": "Linknet",
    "pspnet": "PSPNet",
    "deeplabv3plus": "DeepLabV3Plus",
}


def check_arch(arch: str) -> None:
    """``paper``, or ``DECODER-ENCODER`` with a segmentation_models.pytorch decoder; the
    encoder's name is checked when the model is built (smp knows its encoders)."""
    if arch == "paper":
        return
    decoder, _, encoder = arch.partition("-")
    if decoder not in SMP_DECODERS or not encoder:
        _bad(
            "arch",
            f"must be paper or DECODER-ENCODER with DECODER one of {', '.join(SMP_DECODERS)} "
            "(e.g. unet-resnet34)",
            arch,
        )
    if importlib.util.find_spec("segmentation_models_pytorch") is None:
        rule = "needs segmentation_models.pytorch (pip install segmentation-models-pytorch)"
        _bad("arch", rule, arch)


def _bad(name: str, rule: str, value: Any) -> typing.NoReturn:
    raise SteelsegError(f"config {name} {rule}, got {value!r}")


def field_type(name: str) -> tuple[type, type | None, bool]:
    """(type, element type of a list or None, whether None is allowed), from the annotation."""
    hint = typing.get_type_hints(TrainConfig)[name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if typing.get_origin(hint) is list:
        return list, typing.get_args(hint)[0], optional
    return hint, None, optional


def coerce(name: str, value: Any, source: str) -> Any:
    """``value`` as field ``name``'s type: an int where a float is expected is fine, a list's
    elements are checked, and numeric strings are converted: flags are strings, and YAML reads
    ``1e-3`` (no dot) as one.

    Raises:
        SteelsegError: the value is not of the field's type.
    """
    kind, element, optional = field_type(name)
    if value is None and optional:
        return None
    if kind is list:
        if not isinstance(value, list | tuple):
            raise SteelsegError(f"{_at(source)}config {name} must be a list, got {value!r}")
        assert element is not None  # field_type names a list's element type
        return [_scalar(name, v, element, source) for v in value]
    return _scalar(name, value, kind, source)


def _scalar(name: str, value: Any, kind: type, source: str) -> Any:
    if isinstance(value, str) and kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise SteelsegError(f"{_at(source)}config {name} must be {kind.__name__}, got {value!r}")


def _at(source: str) -> str:
    """How a message names where a value came from: ``run.yaml: ``, or nothing when unsaid."""
    return f"{source}: " if source else ""


COMMAND_LINE = "command line"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """A flag per config field, grouped as the config is (``--batch-size``;
    ``--use-gpu/--no-use-gpu`` for booleans, comma lists for lists) and ``--config FILE``;
    flags override the file."""
    parser.add_argument("--config", help="YAML or JSON file of config keys")
    groups = {
        name: parser.add_argument_group(f"{name} config", about) for name, about in GROUPS.items()
    }
    defaults = TrainConfig().to_dict()
    for name, f in FIELDS.items():
        kind, _, _ = field_type(name)
        flag = "--" + name.replace("_", "-")
        text = f"{f.metadata['help']} (default: {_show(defaults[name])})"
        group = groups[f.metadata["group"]]
        if kind is bool:
            action = argparse.BooleanOptionalAction
            group.add_argument(flag, dest=name, action=action, default=argparse.SUPPRESS, help=text)
        else:
            # values stay strings here; ``from_args`` converts and checks them like a file's
            parse = _split_list if kind is list else str
            group.add_argument(
                flag,
                dest=name,
                type=parse,
                default=argparse.SUPPRESS,
                help=text,
                metavar=name.upper(),
            )


def _split_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _show(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return repr(value) if value == "" else str(value)


def from_args(args: argparse.Namespace) -> TrainConfig:
    """The config from ``--config FILE`` (if any) overridden by the flags given."""
    values = read_config_file(args.config) if args.config else {}
    flags = _worker_range({k: v for k, v in vars(args).items() if k in FIELDS}, COMMAND_LINE)
    flags = {k: coerce(k, v, COMMAND_LINE) for k, v in flags.items()}
    return TrainConfig.from_dict({**values, **flags}, args.config or COMMAND_LINE)


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML or JSON mapping of config keys (not yet checked against TrainConfig), from a
    local file or a URI."""
    file = locate(path, "config file")
    if not file.is_file():
        raise SteelsegError(f"{file}: no such config file")
    suffix = posixpath.splitext(file.name)[1]
    try:
        text = file.read_bytes().decode("utf-8-sig")  # a BOM, as Windows editors write
        values = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        reason = " ".join(str(e).split())
        kind = suffix.lstrip(".") or "YAML"
        raise SteelsegError(f"{file}: not valid {kind} ({reason})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise SteelsegError(
            f"{file}: expected a mapping of config keys, got {type(values).__name__}"
        )
    return values
