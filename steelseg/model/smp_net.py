"""Networks from segmentation_models.pytorch (an optional dependency), for ``--arch
DECODER-ENCODER``: the paper's network stays the default; these serve users who want a lighter
or a larger one, with the same inputs, checkpoints, fusion channels, calibration and prediction.
"""

import math

import torch
from torch import nn

from steelseg.config import SMP_DECODERS
from steelseg.errors import SteelsegError


class SmpNet(nn.Module):
    """An smp model behind the interface the paper's ``UNet`` has: ``forward`` gives logits,
    ``forward_with_features`` the logits and the deepest encoder features.

    Args:
        arch: ``DECODER-ENCODER``, e.g. ``unet-resnet34``.
        n_classes, in_channels: as for ``UNet``.
        encoder_weights: ``None`` (random) or ``"imagenet"`` (smp downloads them).
    """

    def __init__(
        self, arch: str, n_classes: int, in_channels: int, encoder_weights: str | None = None
    ):
        super().__init__()
        try:
            import segmentation_models_pytorch as smp
        except ImportError:
            raise SteelsegError(
                f"config arch {arch!r} needs segmentation_models.pytorch: "
                "pip install segmentation-models-pytorch"
            ) from None
        decoder, _, encoder = arch.partition("-")
        try:
            self.model = smp.create_model(
                SMP_DECODERS[decoder],
                encoder_name=encoder,
                encoder_weights=encoder_weights,
                in_channels=in_channels,
                classes=n_classes,
            )
        except KeyError:
            raise SteelsegError(
                f"config arch {arch!r}: segmentation_models.pytorch has no encoder {encoder!r}"
            ) from None
        except ValueError as e:
            raise SteelsegError(f"config arch {arch!r}: {e}") from None
        self.n_classes, self.in_channels = n_classes, in_channels
        self.deepest_channels = self.model.encoder.out_channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.encoder(x)
        logits = self.model.segmentation_head(self.model.decoder(features))
        return logits, features[-1]

    def set_prior(self, prior: float) -> None:
        """The head's bias at the log-odds of ``prior``, as ``init_weights`` does for the paper's
        network."""
        head = next(m for m in self.model.segmentation_head.modules() if isinstance(m, nn.Conv2d))
        assert head.bias is not None  # smp's heads have one; it carries the prior
        nn.init.constant_(head.bias, math.log(prior / (1 - prior)))
