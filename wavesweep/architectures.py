"""The network architectures, in plain torch + torchvision (no wavesweep import).

``wavesweep.models`` registers these builders by name; a registered model ships this file
beside its state dict (``model_registry.register_model``), so whoever loads it rebuilds the same
``nn.Module`` without wavesweep installed. Keep it free of wavesweep imports.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: inputs smaller than this get the small-input ResNet stem
SMALL_INPUT = 64


def _torchvision_resnet(arch: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """torchvision ResNet ``arch`` (random init). For small images (side < 64: digits 8,
    MNIST 28, CIFAR 32) the 7x7 stride-2 stem and its max-pool would shrink the input to
    nothing, so the first conv becomes 3x3 stride 1 (in_channels -> 64) and the max-pool an
    Identity; every residual-block conv stays the real one."""
    import torchvision.models

    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if image_size < SMALL_INPUT:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """torchvision ResNet-18 (20 convs, 11.2M conv weights), small-input stem below 64 px."""
    return _torchvision_resnet("resnet18", num_classes, in_channels, image_size)


class SmallCNN(nn.Module):
    """Three 3x3 convs (32, 64, 128 channels) with batch norm, one 2x2 max-pool, global
    average pool and a linear head. Works for any input side >= 2."""

    def __init__(self, num_classes: int, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # (B, 64, H/2, W/2)
            nn.Conv2d(64, 128, 3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),  # (B, 128, 1, 1)
        )
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))  # (B, num_classes)


def cnn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels)


class MLP(nn.Module):
    """Flatten (B, C, H, W) -> (B, C*H*W), then Linear-ReLU 256, Linear-ReLU 128, Linear."""

    def __init__(self, num_classes: int, in_features: int, hidden: tuple[int, ...] = (256, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return MLP(num_classes, in_channels * image_size * image_size)


def resnet50(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """torchvision ResNet-50 (53 convs, 23.5M conv weights; bottleneck blocks with 1x1 convs),
    small-input stem below 64 px as for resnet18."""
    return _torchvision_resnet("resnet50", num_classes, in_channels, image_size)


#: ViT-B/16 patch side: the image side must be a multiple of it
VIT_PATCH = 16


def vit_b_16(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """torchvision ViT-B/16 (12 blocks, width 768, 86M weights) for image_size x image_size
    inputs: (image_size/16)^2 patch tokens plus the class token, so a small side is cheap
    (32 px: 5 tokens). ``in_channels != 3`` replaces the patch embedding conv, initialised as
    torchvision initialises it. Prune it with ``targets=linear`` (see the module docstring)."""
    if image_size % VIT_PATCH:
        raise ValueError(f"vit_b_16 needs image_size divisible by {VIT_PATCH}, got {image_size!r}")
    import torchvision.models

    model = torchvision.models.vit_b_16(weights=None, num_classes=num_classes, image_size=image_size)
    if in_channels != 3:
        hidden = model.hidden_dim
        model.conv_proj = nn.Conv2d(in_channels, hidden, kernel_size=VIT_PATCH, stride=VIT_PATCH)
        nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / (in_channels * VIT_PATCH * VIT_PATCH)))
        nn.init.zeros_(model.conv_proj.bias)
    return model



#: name -> ``builder(num_classes, in_channels, image_size) -> nn.Module``
BUILDERS = {"resnet18": resnet18, "cnn": cnn, "mlp": mlp, "resnet50": resnet50, "vit_b_16": vit_b_16}


def build(name: str, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """A freshly initialised ``name`` for inputs (B, in_channels, image_size, image_size)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(BUILDERS)}")
    return BUILDERS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
