"""The training step and the evaluation, free of Ray: the Ray Train loop, the recipe benchmark
and the bare-step benchmark all run these same functions.

Batches are dicts of uint8 tensors as the data pipeline delivers them: ``image`` (B, H, W, C) and
``mask`` (B, H, W) with bit c set where class c + 1 is present. They become float only here, on
the worker's device.
"""

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from steelseg.config import TrainConfig
from steelseg.data.images import in_channels
from steelseg.evaluation.metrics import DiceCounts
from steelseg.model.losses import DiceBCELoss
from steelseg.model.pretrained import load_encoder
from steelseg.model.unet import ENCODER_STRIDE, UNet, init_weights

N_CLASSES = 4
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
EXTRA_MEAN, EXTRA_STD = 0.5, 0.25


def build_model(config: TrainConfig) -> UNet:
    model = UNet(N_CLASSES, in_channels(config.modalities))
    init_weights(model, config.head_prior)
    load_encoder(model, config.pretrained)
    return model


def build_loss(config: TrainConfig) -> DiceBCELoss:
    return DiceBCELoss(config.bce_weight, config.dice_weight, pos_weight=config.pos_weight)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norm weights."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(step: int, warmup_steps: int, total_steps: int, floor: float = 0.01) -> float:
    """Linear warm-up to 1, then cosine decay to ``floor`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config.warmup_steps, total_steps)
    )


def unpack_masks(bits: torch.Tensor) -> torch.Tensor:
    """(B, H, W) class bits -> (B, 4, H, W) float 0/1."""
    shifts = torch.arange(N_CLASSES, device=bits.device, dtype=torch.uint8).view(1, -1, 1, 1)
    return ((bits.unsqueeze(1) >> shifts) & 1).float()


@lru_cache(maxsize=8)
def normalisation(channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (1, C, 1, 1) on the device, made once: building them every batch
    would be a blocking host-to-device copy per step."""
    mean = torch.tensor(RGB_MEAN + (EXTRA_MEAN,) * (channels - 3), device=device)
    std = torch.tensor(RGB_STD + (EXTRA_STD,) * (channels - 3), device=device)
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def to_inputs(
    batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch -> normalised float images (B, C, H, W) and targets (B, 4, H, W)."""
    image = batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    mean, std = normalisation(image.shape[1], device)
    image = (image - mean) / std
    # The permuted batch is channels_last in memory; the model must get the layout of its
    # weights, else convolutions and DDP's gradient buckets disagree (28% slower on CPU, and DDP
    # warns that grad strides do not match bucket view strides).
    layout = torch.channels_last if channels_last else torch.contiguous_format
    image = image.contiguous(memory_format=layout)
    return image, unpack_masks(batch["mask"].to(device, non_blocking=True))


def forward_padded(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits for images of any size: the U-Net needs sides divisible by its stride, so the input
    is padded at the bottom and right (edge pixels repeated) and the logits cropped back, so
    that losses and scores see only the image's own pixels."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % ENCODER_STRIDE, -width % ENCODER_STRIDE
    if not (pad_h or pad_w):
        return model(x)
    return model(F.pad(x, (0, pad_w, 0, pad_h), mode="replicate"))[..., :height, :width]


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA (no GradScaler needed, unlike fp16); nothing on CPU."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    *,
    amp: bool = False,
    grad_accum: int = 1,
    on_step: Callable[[int, float, int], None] | None = None,
) -> tuple[float, int]:
    """One pass over ``batches``; returns (sum of per-image loss, images seen).

    ``on_step(batch_index, loss, batch_images)`` is called after every batch. The optimizer steps
    every ``grad_accum`` batches and once more at the end for a remainder, whose gradient is the
    mean over its own batches.
    """
    model.train()
    total, seen, pending = 0.0, 0, 0
    for i, batch in enumerate(batches):
        x, y = to_inputs(batch, device, channels_last=amp and device.type == "cuda")
        with autocast(device, amp):
            logits = forward_padded(model, x)
        loss = loss_fn(logits, y)
        # scale so accumulated gradients average over the accumulated batches
        (loss / grad_accum).backward()
        pending += 1
        if pending == grad_accum:
            _step(optimizer, scheduler)
            pending = 0
        value = loss.item()
        total += value * x.shape[0]
        seen += x.shape[0]
        if on_step:
            on_step(i, value, x.shape[0])
    if pending:
        _rescale_gradients(model, grad_accum / pending)
        _step(optimizer, scheduler)
    return total, seen


def _rescale_gradients(model: nn.Module, factor: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def _step(optimizer, scheduler) -> None:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: nn.Module,
    device: torch.device,
    *,
    threshold: float = 0.5,
    amp: bool = False,
    keep: int = 0,
) -> tuple[float, int, DiceCounts, list[tuple[torch.Tensor, ...]]]:
    """Loss sum, images, Dice counts (not yet all-reduced) and up to ``keep`` (image, truth,
    prediction) samples for figures."""
    model.eval()
    counts = DiceCounts(N_CLASSES, device)
    total, seen, samples = 0.0, 0, []
    for batch in batches:
        x, y = to_inputs(batch, device, channels_last=amp and device.type == "cuda")
        with autocast(device, amp):
            logits = forward_padded(model, x)
        total += loss_fn(logits, y).item() * x.shape[0]
        seen += x.shape[0]
        pred = torch.sigmoid(logits.float()) > threshold
        counts.update(pred, y.bool())
        for k in range(min(keep - len(samples), x.shape[0])):
            samples.append((batch["image"][k].cpu(), y[k].cpu(), pred[k].cpu()))
    return total, seen, counts, samples
