"""The recipe's parts, built from a run's config: the model (its network, initialisation, encoder
weights and presence head), the loss, AdamW and the warm-up + cosine learning-rate schedule."""

import math

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
    if config.arch == "paper":
        net = init_weights(UNet(N_CLASSES, channels), config.head_prior)
        load_encoder(net, config.pretrained)
        deepest = net.encoder.layer4[-1].conv2.out_channels
    else:
        weights = "imagenet" if config.pretrained == "imagenet" else None
        net = SmpNet(config.arch, N_CLASSES, channels, encoder_weights=weights)
        net.set_prior(config.head_prior)
        deepest = net.deepest_channels
    if config.presence_head:
        return PresenceGate(net, deepest, N_CLASSES)
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
    """Batches per epoch on every rank (Ray splits the rows equally among the workers)."""
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
