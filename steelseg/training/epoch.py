"""One training epoch and one validation pass, free of Ray: the Ray Train worker loop, the recipe
benchmark and the bare-step benchmark all run these same functions."""

from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from steelseg.domain import N_CLASSES
from steelseg.evaluation.metrics import DiceCounts
from steelseg.model.inputs import autocast, forward_padded, prefers_channels_last, to_inputs


class EpochTotals(NamedTuple):
    """What a training pass adds up: the sum of per-image losses, the images seen and the first
    batch (0-based) whose loss was not finite, -1 if none."""

    loss_sum: float
    images: int
    first_nonfinite_batch: int


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool | None = None,
    grad_accum: int = 1,
    on_step: Callable[[int, torch.Tensor, int], None] | None = None,
    grey: bool = False,
) -> EpochTotals:
    """One pass over ``batches``.

    ``on_step(batch_index, loss, batch_images)`` is called after every batch with the loss as a
    0-d tensor on the device: reading it (``float``) waits for the device, so a caller reads it
    only when it shows it; the loop itself reads the loss once, at the end, and with it the
    first batch whose loss was NaN or infinite (tracked on the device). The optimizer steps
    every ``grad_accum`` batches and once more at the end for a remainder, whose gradient is the
    mean over its own batches; a DDP model (one with ``no_sync``) all-reduces gradients only
    for the batch before a step. ``channels_last`` (the model's layout; default:
    ``prefers_channels_last``) is the layout the inputs are given in; ``grey``: the batches'
    visible images are one grey channel (``inputs.to_inputs``).
    """
    model.train()
    if channels_last is None:
        channels_last = prefers_channels_last(device, amp)
    # float64: a sum of large, finite losses does not overflow to inf
    total, seen, pending = torch.zeros((), dtype=torch.float64, device=device), 0, 0
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    for i, (batch, last) in enumerate(_with_last(batches)):
        x, y = to_inputs(batch, device, channels_last=channels_last, grey=grey)
        steps = last or pending + 1 == grad_accum
        # every rank has as many batches, so all skip the same all-reduces
        no_sync = getattr(model, "no_sync", None)  # DDP's
        with nullcontext() if steps or no_sync is None else no_sync():
            with autocast(device, amp):
                logits = forward_padded(model, x)
            loss = loss_fn(logits, y)
            # scale so accumulated gradients average over the accumulated batches
            (loss / grad_accum).backward()
        pending += 1
        loss = loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i, first_bad)
        if pending == grad_accum:
            _step(optimizer, scheduler)
            pending = 0
        total += loss * x.shape[0]
        seen += x.shape[0]
        if on_step:
            on_step(i, loss, x.shape[0])
    if pending:
        _rescale_gradients(model, grad_accum / pending)
        _step(optimizer, scheduler)
    return EpochTotals(total.item(), seen, int(first_bad.item()))


def _with_last(items: Iterable) -> Iterator[tuple[Any, bool]]:
    """Each item and whether it is the last (one item read ahead)."""
    items = iter(items)
    sentinel = object()
    item = next(items, sentinel)
    while item is not sentinel:
        after = next(items, sentinel)
        yield item, after is sentinel
        item = after


def _rescale_gradients(model: nn.Module, factor: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(factor)


def _step(optimizer, scheduler) -> None:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


@torch.no_grad()
def broadcast_buffers(model: nn.Module) -> None:
    """Every rank's buffers (BatchNorm's running statistics) made rank 0's, which its checkpoint
    holds: each rank's training forward updated its own on its own batches (no-op outside a
    process group)."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


@torch.no_grad()
def validate_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: nn.Module,
    device: torch.device,
    *,
    threshold: float = 0.5,
    amp: bool = False,
    channels_last: bool | None = None,
    keep: int = 0,
    grey: bool = False,
) -> tuple[float, int, DiceCounts, list[tuple[torch.Tensor, ...]]]:
    """Loss sum, images, Dice counts (not yet all-reduced) and up to ``keep`` (image, truth,
    prediction) samples for figures; ``grey`` as for ``train_one_epoch``."""
    model.eval()
    if channels_last is None:
        channels_last = prefers_channels_last(device, amp)
    counts = DiceCounts(N_CLASSES, device)
    total, seen = torch.zeros((), device=device), 0
    samples: list[tuple[torch.Tensor, ...]] = []
    for batch in batches:
        x, y = to_inputs(batch, device, channels_last=channels_last, grey=grey)
        with autocast(device, amp):
            logits = forward_padded(model, x)
        total += loss_fn(logits, y).float() * x.shape[0]
        seen += x.shape[0]
        pred = torch.sigmoid(logits.float()) > threshold
        counts.update(pred, y.bool())
        for k in range(min(keep - len(samples), x.shape[0])):
            samples.append((batch["image"][k].cpu(), y[k].cpu(), pred[k].cpu()))
    return float(total.item()), seen, counts, samples
