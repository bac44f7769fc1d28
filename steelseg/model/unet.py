"""The paper's network: a U-Net whose encoder is a resnet18.

Read top to bottom: ``conv_relu`` -> ``BasicBlock`` -> ``ResNet18Encoder`` -> ``UNet``. The
encoder is torchvision's resnet18 without its classifier, written out with torchvision's
parameter names so that its state_dicts (ImageNet weights) load as they are; written out
because importing torchvision costs every Ray process that builds the model seconds (it imports
torch._dynamo). Skips from the five encoder stages pass through
1x1 conv + ReLU adapters; the decoder upsamples bilinearly (x2, align_corners=True) and fuses
each skip with 3x3 conv + ReLU; a full-resolution branch on the input joins after the last
upsample; a 1x1 head gives one logit per class and pixel.

With ``in_channels`` > 3 the stacked imaging modalities enter both the encoder's first conv and
the full-resolution branch (early fusion). This module does no I/O: ``steelseg.model.pretrained``
loads encoder weights into it.
"""

import math

import torch
from torch import nn

from steelseg.domain import ENCODER_STRIDE


def conv_relu(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2), nn.ReLU(inplace=True)
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a residual connection (1x1 conv when the shape
    changes), as torchvision's ``resnet.BasicBlock``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18Encoder(nn.Module):
    """torchvision's resnet18 up to ``layer4`` (no pooling, no classifier), initialised as
    torchvision initialises it."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(64, 64), BasicBlock(64, 64))
        self.layer2 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.layer3 = nn.Sequential(BasicBlock(128, 256, 2), BasicBlock(256, 256))
        self.layer4 = nn.Sequential(BasicBlock(256, 512, 2), BasicBlock(512, 512))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


class UNet(nn.Module):
    """ResNet18 U-Net.

    Args:
        n_classes: output channels, one logit per class.
        in_channels: input channels; 3 for the visible images, more for fused modalities.

    Shape:
        input (N, in_channels, H, W) with H and W divisible by 32; output (N, n_classes, H, W).
    """

    def __init__(self, n_classes: int = 4, in_channels: int = 3):
        super().__init__()
        self.n_classes = n_classes
        self.in_channels = in_channels
        self.encoder = ResNet18Encoder(in_channels)
        self.deepest_channels = 512  # layer4's, which a presence head reads

        self.layer0_1x1 = conv_relu(64, 64, 1)
        self.layer1_1x1 = conv_relu(64, 64, 1)
        self.layer2_1x1 = conv_relu(128, 128, 1)
        self.layer3_1x1 = conv_relu(256, 256, 1)
        self.layer4_1x1 = conv_relu(512, 512, 1)

        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv_up3 = conv_relu(256 + 512, 512, 3)
        self.conv_up2 = conv_relu(128 + 512, 256, 3)
        self.conv_up1 = conv_relu(64 + 256, 256, 3)
        self.conv_up0 = conv_relu(64 + 256, 128, 3)

        self.conv_original_size0 = conv_relu(in_channels, 64, 3)
        self.conv_original_size1 = conv_relu(64, 64, 3)
        self.conv_original_size2 = conv_relu(64 + 128, 64, 3)
        self.conv_last = nn.Conv2d(64, n_classes, 1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five encoder stages at strides 2, 4, 8, 16 and 32."""
        e = self.encoder
        layer0 = e.relu(e.bn1(e.conv1(x)))
        layer1 = e.layer1(e.maxpool(layer0))
        layer2 = e.layer2(layer1)
        layer3 = e.layer3(layer2)
        layer4 = e.layer4(layer3)
        return [layer0, layer1, layer2, layer3, layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits and the deepest encoder features (stride 32), which an image-level head
        (``steelseg.model.presence``) reads."""
        height, width = x.shape[-2:]
        if height % ENCODER_STRIDE or width % ENCODER_STRIDE:
            raise ValueError(
                f"UNet input height and width must be divisible by {ENCODER_STRIDE}, "
                f"got {height}x{width}"
            )
        x_original = self.conv_original_size1(self.conv_original_size0(x))
        layer0, layer1, layer2, layer3, layer4 = self.encode(x)

        x = self.upsample(self.layer4_1x1(layer4))
        x = self.conv_up3(torch.cat([x, self.layer3_1x1(layer3)], dim=1))
        x = self.upsample(x)
        x = self.conv_up2(torch.cat([x, self.layer2_1x1(layer2)], dim=1))
        x = self.upsample(x)
        x = self.conv_up1(torch.cat([x, self.layer1_1x1(layer1)], dim=1))
        x = self.upsample(x)
        x = self.conv_up0(torch.cat([x, self.layer0_1x1(layer0)], dim=1))
        x = self.upsample(x)
        x = self.conv_original_size2(torch.cat([x, x_original], dim=1))
        return self.conv_last(x), layer4


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_weights(model: UNet, head_prior: float = 0.01) -> UNet:
    """Initialisation for training from random weights.

    He initialisation for the decoder convs (PyTorch's default is scaled for no ReLU); the last
    BatchNorm of every residual block set to zero, so each block starts as the identity; and
    the head's bias at the log-odds of ``head_prior``, so the first steps do not spend
    themselves pushing 99% background pixels down, which is how the paper's recipe collapsed to
    predicting no defect at all. Pretrained encoder weights, if any, are loaded after this.
    """
    for name, module in model.named_modules():
        if name.startswith("encoder"):
            continue
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    e = model.encoder
    for block in (*e.layer1, *e.layer2, *e.layer3, *e.layer4):
        nn.init.zeros_(block.bn2.weight)
    nn.init.normal_(model.conv_last.weight, std=0.01)
    assert model.conv_last.bias is not None  # the head's bias carries the prior
    nn.init.constant_(model.conv_last.bias, math.log(head_prior / (1 - head_prior)))
    return model
