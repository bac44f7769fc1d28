"""An image-level presence head beside a segmentation network, used as a learned gate.

The best Severstal solutions decided per image and class whether a defect is there at all
(a classifier) and only then drew its mask: Kaggle's Dice gives an empty pair 1 for an empty
prediction and 0 for a single false pixel. Here the classifier shares the encoder: average- and
max-pooled deepest features -> one logit per class, trained jointly with BCE on "the class has
any pixel in this crop". In training the module returns both outputs for the loss; in eval it
returns one tensor of logits whose sigmoid is p(pixel) x p(class present), so validation,
calibration and prediction use the gate without knowing it is there.
"""

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


def gated_logits(pixel_logits: torch.Tensor, presence_logits: torch.Tensor) -> torch.Tensor:
    """logit(sigmoid(pixel) * sigmoid(presence)), computed in log space in float32.

    Shape:
        pixel_logits (N, C, H, W), presence_logits (N, C) -> (N, C, H, W).
    """
    log_presence = F.logsigmoid(presence_logits.float())[..., None, None]
    log_p = F.logsigmoid(pixel_logits.float()) + log_presence
    log_p = log_p.clamp(max=-1e-7)  # p < 1, so log(1 - p) is finite
    return log_p - torch.log(-torch.expm1(log_p))


class FeatureNet(Protocol):
    """What the gate needs of a network (``UNet``, ``SmpNet``): its logits and deepest
    features."""

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class PresenceGate(nn.Module):
    """``net`` (any module with ``forward_with_features(x) -> (logits, deepest)``) and a linear
    presence head on its deepest features.

    Args:
        net: the segmentation network.
        channels: channels of its deepest features.
        n_classes: classes, one presence logit each.

    Shape:
        input (N, C_in, H, W); training: ((N, n_classes, H, W), (N, n_classes));
        eval: gated logits (N, n_classes, H, W).
    """

    def __init__(self, net: FeatureNet, channels: int, n_classes: int):
        super().__init__()
        self.net = net
        self.presence = nn.Linear(2 * channels, n_classes)

    def forward(self, x: torch.Tensor):
        logits, deepest = self.net.forward_with_features(x)
        pooled = torch.cat([deepest.mean(dim=(2, 3)), deepest.amax(dim=(2, 3))], dim=1)
        presence = self.presence(pooled)
        if self.training:
            return logits, presence
        return gated_logits(logits, presence)
