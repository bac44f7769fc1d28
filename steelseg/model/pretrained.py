"""Pretrained encoder weights for ``steelseg.model.unet.UNet``, kept apart from the model (no
I/O there).

Two sources: a local torchvision-format resnet18 state_dict file (what a cluster without
internet uses: ``resnet18-f37072fd.pth`` from torchvision's cache, say), or torchvision's
ImageNet weights API, which downloads. Random initialisation is the default elsewhere.
"""

import os

import torch

from steelseg.errors import SteelsegError, one_line
from steelseg.model.unet import UNet
from steelseg.storage import locate

UNUSED_KEYS = ("fc.weight", "fc.bias")


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB weights (out, 3, k, k) for ``in_channels`` inputs: the RGB ones first, then their
    mean for every extra channel, so the visible channels start exactly as pretrained."""
    if in_channels == weight.shape[1]:
        return weight
    if in_channels < weight.shape[1]:
        return weight[:, :in_channels].clone()
    extra = weight.mean(dim=1, keepdim=True).expand(-1, in_channels - weight.shape[1], -1, -1)
    return torch.cat([weight, extra], dim=1)


def load_encoder_state(model: UNet, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a torchvision resnet18 state_dict into the model's encoder.

    Raises:
        SteelsegError: keys missing from or unexpected in ``state``, or shapes that differ,
            each named.
    """
    state = {k: v for k, v in state.items() if k not in UNUSED_KEYS}
    if "conv1.weight" in state:
        state["conv1.weight"] = adapt_first_conv(state["conv1.weight"], model.in_channels)
    expected = model.encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise SteelsegError(
            f"{source}: not a torchvision resnet18 state_dict; missing keys: "
            f"{_names(missing)}; unexpected keys: {_names(unexpected)}"
        )
    wrong = [k for k in expected if expected[k].shape != state[k].shape]
    if wrong:
        k = wrong[0]
        raise SteelsegError(
            f"{source}: {k} has shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
        )
    model.encoder.load_state_dict(state)


def _names(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_encoder_file(model: UNet, path: str | os.PathLike) -> None:
    """Load a torchvision-format resnet18 state_dict file (local or in a bucket) into the
    encoder."""
    file = locate(path, "pretrained")
    if not file.is_file():
        raise SteelsegError(f"{file}: no such weights file")
    try:
        state = torch.load(file.open_buffer(), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file that is not a state_dict
        raise SteelsegError(f"{file}: cannot read weights ({one_line(e)})") from None
    if not isinstance(state, dict):
        raise SteelsegError(f"{file}: holds a {type(state).__name__}, not a state_dict")
    load_encoder_state(model, state, str(file))


def load_encoder_imagenet(model: UNet) -> None:
    """Download torchvision's ImageNet resnet18 weights (or take them from its cache)."""
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=False)
    except OSError as e:  # URLError is an OSError
        raise SteelsegError(
            f"cannot download ImageNet resnet18 weights ({e}); offline, fetch {weights.url} "
            "elsewhere and pass its path instead"
        ) from None
    load_encoder_state(model, state, weights.url)


def load_encoder(model: UNet, source: str | None) -> None:
    """``None`` or ``""``: keep the random initialisation; ``"imagenet"``: torchvision's
    weights API; anything else: a state_dict file's path or URI."""
    if not source:
        return
    if source == "imagenet":
        load_encoder_imagenet(model)
    else:
        load_encoder_file(model, source)
