"""The recipe's parts, built from a run's config: the model (its network, initialisation, encoder
weights and presence head), the loss, AdamW and the warm-up + cosine learning-rate schedule; and
``build_training``, which puts them together on a device, restored from a checkpoint's state when
there is one. Free of Ray: the Ray Train worker, the benchmarks and ``benchmarks/gpu_check.py``
build a rank's training the same way.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from steelseg.config import TrainConfig
from steelseg.data.images import in_channels
from steelseg.domain import N_CLASSES
from steelseg.model.losses import DiceBCELoss
from steelseg.model.presence import PresenceGate
from steelseg.model.pretrained import load_encoder
from steelseg.model.smp_net import SmpNet
from steelseg.model.unet import UNet, init_weights


def build_model(config: TrainConfig) -> nn.Module:
    """The config's network (the paper's U-Net unless ``arch`` names an smp one), initialised,
    with its encoder weights, behind a presence head if the config asks for one."""
    channels = in_channels(config.modalities)
    net: UNet | SmpNet
    if config.arch == "paper":
        net = init_weights(UNet(N_CLASSES, channels), config.head_prior)
        load_encoder(net, config.pretrained)
    else:
        weights = "imagenet" if config.pretrained == "imagenet" else None
        net = SmpNet(config.arch, N_CLASSES, channels, encoder_weights=weights)
        net.set_prior(config.head_prior)
    if config.presence_head:
        return PresenceGate(net, net.deepest_channels, N_CLASSES)
    return net


def build_loss(config: TrainConfig) -> DiceBCELoss:
    presence = config.presence_weight if config.presence_head else 0.0
    return DiceBCELoss(
        config.bce_weight,
        config.dice_weight,
        pos_weight=config.pos_weight,
        presence_weight=presence,
        dice_over=config.dice_over,
    )


def build_optimizer(
    config: TrainConfig, model: nn.Module, *, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights. ``fused``: one kernel for all
    parameters (CUDA), measured in benchmarks/bench_train.py."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, fused=fused or None)


def lr_factor(step: int, warmup_steps: int, total_steps: int, floor: float = 0.01) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batches_per_epoch(train_images: int, world_size: int, batch_size: int) -> int:
    """Batches per epoch on every rank (each reads an equal share: pipeline.train_rows)."""
    return math.ceil((train_images // world_size) / batch_size)


def steps_per_epoch(train_images: int, world_size: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps per epoch on every rank."""
    return math.ceil(batches_per_epoch(train_images, world_size, batch_size) / grad_accum)


def move_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Put the schedule at ``step`` (and the optimizer's learning rates with it): after a
    restore with another worker count, where the steps per epoch are not what they were."""
    scheduler.last_epoch = step
    for group, base, factor in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas
    ):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, total_steps)
    )


@dataclass
class Training:
    """A rank's model, optimizer and schedule, and where the run stands: the next epoch, the
    batches and the optimizer steps taken since the run began (resumes included)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    epoch: int = 0
    global_step: int = 0
    optimizer_steps: int = 0


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """The optimizer steps of the whole run: ``config.epochs`` of ``steps_per_epoch``, or
    ``config.max_steps`` if that is fewer."""
    steps = steps_per_epoch * config.epochs
    return min(steps, config.max_steps) if config.max_steps else steps


def build_training(
    config: TrainConfig,
    device: torch.device,
    steps_per_epoch: int,
    *,
    channels_last: bool = False,
    world_size: int = 1,
    state: dict | None = None,
) -> Training:
    """The config's model on ``device`` (channels_last if asked, SyncBatchNorm with
    ``config.sync_bn`` on more than one rank), AdamW and the schedule over ``total_steps``;
    restored from a checkpoint's ``state`` (``runs.read_state``) if given.

    The model is on its device before the optimizer exists: ``Optimizer.load_state_dict``
    puts each state tensor on its parameter's device when it loads, so a state loaded while
    the model was still on the CPU would stay there and the first step on a GPU would fail.
    """
    torch.manual_seed(config.seed)
    model = build_model(config).to(device)
    if channels_last:  # before DDP wraps it: its gradient buckets take these strides
        model = model.to(memory_format=torch.channels_last)
    if config.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer, total_steps(config, steps_per_epoch))
    training = Training(model, optimizer, scheduler)
    if state is not None:
        restore(training, state, steps_per_epoch)
    return training


def restore(training: Training, state: dict, steps_per_epoch: int) -> None:
    """Load a checkpoint's weights, optimizer and schedule into ``training``, whose model is on
    its device already. Checkpoints are taken at the end of an epoch: the schedule goes on from
    the start of the next one, in this attempt's steps per epoch (the stored count, unless the
    number of workers changed)."""
    training.model.load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.scheduler.load_state_dict(state["scheduler"])
    move_schedule(training.scheduler, state["epoch"] * steps_per_epoch)
    training.epoch, training.global_step = state["epoch"], state["global_step"]
    training.optimizer_steps = state.get("optimizer_steps", state["scheduler"]["last_epoch"])
