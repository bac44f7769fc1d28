"""From the data pipeline's uint8 batches to the model and back: batches are dicts of uint8
tensors, ``image`` (B, H, W, C) and ``mask`` (B, H, W) with bit c set where class c + 1 is present;
they become float only here, on the device. Training, validation and prediction share these.
"""

from contextlib import nullcontext
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from steelseg.domain import ENCODER_STRIDE, N_CLASSES

RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)
EXTRA_MEAN, EXTRA_STD = 0.5, 0.25


def prefers_channels_last(device: torch.device, amp: bool) -> bool:
    """Whether the model and its inputs are kept channels_last on ``device``: on CUDA with bf16
    autocast (tensor cores), and on CPUs with AVX-512, where oneDNN's NHWC convolutions were
    4-21% faster for both networks, training and prediction, while on an AVX2 CPU they were
    26-28% slower (docs/performance.md). The only place this is decided."""
    if device.type == "cuda":
        return amp
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability() == "AVX512"


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """The precision ``autocast`` runs the model in on ``device``, None for float32: with
    ``amp``, bf16 on CUDA and on a CPU with bf16 instructions (``cpu_runs_bf16``), where oneDNN
    trained and predicted faster (docs/performance.md); elsewhere a CPU emulates bf16, slower
    than float32. The only place this is decided; the loss, the metrics' counts and BatchNorm's
    weights and running statistics stay float32 either way."""
    if not amp:
        return None
    if device.type == "cuda" or (device.type == "cpu" and cpu_runs_bf16()):
        return torch.bfloat16
    return None


def cpu_runs_bf16() -> bool:
    """Whether this CPU has bf16 instructions (avx512_bf16 or AMX) as torch reports them and
    oneDNN is there to use them; a torch without these (private) probes counts as no."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if not torch.backends.mkldnn.is_available():
        return False
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def unpack_masks(bits: torch.Tensor) -> torch.Tensor:
    """(B, H, W) class bits -> (B, 4, H, W) float 0/1."""
    shifts = torch.arange(N_CLASSES, device=bits.device, dtype=torch.uint8).view(1, -1, 1, 1)
    return ((bits.unsqueeze(1) >> shifts) & 1).float()


def normalisation_values(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of images scaled to [0, 1]: ImageNet's for R, G, B, and one
    pair for every further (fused) channel."""
    extra = channels - 3
    return RGB_MEAN + (EXTRA_MEAN,) * extra, RGB_STD + (EXTRA_STD,) * extra


@lru_cache(maxsize=8)
def normalisation(channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``normalisation_values`` as (1, C, 1, 1) tensors on the device, made once: building them
    every batch would be a blocking host-to-device copy per step."""
    mean, std = (torch.tensor(v, device=device) for v in normalisation_values(channels))
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def to_inputs(
    batch: dict[str, torch.Tensor],
    device: torch.device,
    channels_last: bool = False,
    grey: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 batch -> normalised float images (B, C, H, W) and targets (B, 4, H, W). With
    ``grey`` the batch's first channel is a grey visible image (``images.read_stack``): it
    becomes the model's three visible channels here, on the device."""
    image = batch["image"].to(device, non_blocking=True).permute(0, 3, 1, 2)
    if grey:
        image = torch.cat([image[:, :1].expand(-1, 3, -1, -1), image[:, 1:]], dim=1)
    image = image.float().div_(255)
    mean, std = normalisation(image.shape[1], device)
    image = (image - mean) / std
    # The permuted batch is channels_last in memory; the model must get the layout of its
    # weights, else convolutions and DDP's gradient buckets disagree (28% slower on CPU, and DDP
    # warns that grad strides do not match bucket view strides).
    layout = torch.channels_last if channels_last else torch.contiguous_format
    image = image.contiguous(memory_format=layout)
    return image, unpack_masks(batch["mask"].to(device, non_blocking=True))


def forward_padded(model: nn.Module, x: torch.Tensor):
    """Logits for images of any size: the U-Net needs sides divisible by its stride, so the input
    is padded at the bottom and right (edge pixels repeated) and the logits cropped back, so
    that losses and scores see only the image's own pixels. A model with a presence head gives
    (pixel logits, presence logits) in training; only the pixel logits are cropped."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % ENCODER_STRIDE, -width % ENCODER_STRIDE
    if not (pad_h or pad_w):
        return model(x)
    out = model(F.pad(x, (0, pad_w, 0, pad_h), mode="replicate"))
    if isinstance(out, tuple):
        return out[0][..., :height, :width], *out[1:]
    return out[..., :height, :width]


def autocast(device: torch.device, enabled: bool):
    """Autocast in ``autocast_dtype``'s precision (bf16 needs no GradScaler, unlike fp16), or
    nothing where that is float32."""
    dtype = autocast_dtype(device, enabled)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
