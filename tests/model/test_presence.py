"""The presence head: its gate's arithmetic, its two outputs, and a model that learns to say
whether a class is on an image."""

import torch
from torch import nn

from steelseg.config import TrainConfig
from steelseg.model.inputs import forward_padded
from steelseg.model.losses import DiceBCELoss, presence_loss
from steelseg.model.presence import PresenceGate, gated_logits
from steelseg.model.unet import count_parameters
from steelseg.training import recipe


def test_gated_probability_is_the_product_of_pixel_and_presence():
    pixel = torch.tensor([-3.0, 0.0, 2.0, 30.0]).view(1, 4, 1, 1).expand(2, 4, 3, 5)
    presence = torch.tensor([[0.0, 1.0, -2.0, 30.0], [-30.0, 0.0, 0.0, 0.0]])
    gated = torch.sigmoid(gated_logits(pixel, presence))
    expected = torch.sigmoid(pixel) * torch.sigmoid(presence)[..., None, None]
    torch.testing.assert_close(gated, expected, rtol=1e-5, atol=1e-6)
    sure = gated_logits(torch.full((1, 4, 1, 1), 80.0), torch.full((1, 4), 80.0))
    assert torch.isfinite(sure).all()


def test_training_gives_both_outputs_and_eval_the_gated_logits():
    torch.manual_seed(0)
    model = recipe.build_model(TrainConfig(presence_head=True))
    assert count_parameters(model) == 17_800_004 + (2 * 512 + 1) * 4
    x = torch.randn(2, 3, 40, 170)  # not a multiple of 32: padded, the pixel logits cropped
    pixel, presence = forward_padded(model.train(), x)
    assert pixel.shape == (2, 4, 40, 170) and presence.shape == (2, 4)
    model.eval()
    with torch.no_grad():
        gated = forward_padded(model, x)
        padded = torch.nn.functional.pad(x, (0, 22, 0, 24), mode="replicate")
        pixel, deepest = model.net.forward_with_features(padded)
        pooled = torch.cat([deepest.mean(dim=(2, 3)), deepest.amax(dim=(2, 3))], dim=1)
        expected = gated_logits(pixel[..., :40, :170], model.presence(pooled))
    torch.testing.assert_close(gated, expected)


def test_presence_loss_is_bce_on_whether_the_class_has_a_pixel():
    targets = torch.zeros(2, 4, 8, 8)
    targets[0, 2, 3, 3] = 1  # image 0 has class 3; nothing else anywhere
    logits = torch.tensor([[-5.0, -5.0, 5.0, -5.0], [-5.0, -5.0, -5.0, -5.0]])
    assert presence_loss(logits, targets) < 0.01
    assert presence_loss(-logits, targets) > 4.9
    pixel = torch.full((2, 4, 8, 8), -5.0)
    loss = DiceBCELoss(1.0, 0.0, presence_weight=2.0)
    expected = loss(pixel, targets) + 2.0 * presence_loss(-logits, targets)
    torch.testing.assert_close(loss((pixel, -logits), targets), expected)


class TinyNet(nn.Module):
    """A segmentation net small enough to train in a test: 1x1-conv logits, 3x3 features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
        self.head = nn.Conv2d(3, 4, 1)

    def forward_with_features(self, x):
        return self.head(x), self.features(x)


def test_the_gate_removes_what_the_pixels_alone_cannot_tell_apart():
    """Every image has the same marked patch; it is class 1 on images with a tag in a corner and
    class 4 on the others. A 1x1-conv pixel head cannot see the tag from the patch, so it marks
    both classes everywhere; the presence head sees the whole image, and the gate removes each
    class from the images that do not have it."""
    torch.manual_seed(0)
    model = PresenceGate(TinyNet(), channels=8, n_classes=4)
    loss_fn = DiceBCELoss(1.0, 0.0, presence_weight=1.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    x = torch.zeros(8, 3, 16, 32)
    x[:4, :, :4, :4] = 3.0
    x[:, :, 4:12, 8:24] = 2.0
    y = torch.zeros(8, 4, 16, 32)
    y[:4, 0, 4:12, 8:24] = 1
    y[4:, 3, 4:12, 8:24] = 1
    model.train()
    for _ in range(300):
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        gated = torch.sigmoid(model(x)).amax(dim=(2, 3))
        pixels_alone = torch.sigmoid(model.net.forward_with_features(x)[0]).amax(dim=(2, 3))
    assert (pixels_alone[:4, 3] > 0.25).all() and (pixels_alone[4:, 0] > 0.25).all()
    assert (gated[:4, 0] > 0.25).all() and (gated[4:, 0] < 0.01).all()
    assert (gated[4:, 3] > 0.25).all() and (gated[:4, 3] < 0.01).all()
