"""A CPU-fast residual net for the CPU protocol: ResNet-9 (Page, 2018) at a chosen width.

Four conv stages (w, 2w, 4w, 8w channels), max-pooling after the widening convs and two
residual blocks, a max-pooled linear head scaled by 1/8 (the DAWNBench trick that keeps
early logits small). Convolutions after the stem run at 16, 8 and 4 px, so most of the
compute sits where a 2-core CPU can afford it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn as nn

if TYPE_CHECKING:
    import torch


def conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(cout), nn.GELU()]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class FastResNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 32, scale: float = 0.125):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(3, w),
            conv_bn(w, 2 * w, pool=True),
            Residual(2 * w),
            conv_bn(2 * w, 4 * w, pool=True),
            conv_bn(4 * w, 8 * w, pool=True),
            Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8 * w, num_classes, bias=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)) * self.scale


def fast_resnet(num_classes: int, image_size: int, width: int = 32) -> nn.Module:
    return FastResNet(num_classes, width)
