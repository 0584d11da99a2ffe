"""Classifier architectures by name. Adding one: a builder function and a line in ARCHS."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from raypurify.models import fast_resnet, resnet, torchvision_nets
from raypurify.registry import Registry


@dataclass(frozen=True)
class Arch:
    name: str
    description: str
    build: Callable[..., nn.Module]  # (num_classes, image_size, **options) -> model


ARCHS = Registry(
    "architecture",
    [
        Arch("resnet18", "ResNet-18 (CIFAR stem at 32 px, ImageNet stem above)", resnet.resnet18),
        Arch("resnet50", "ResNet-50 (CIFAR stem at 32 px, ImageNet stem above)", resnet.resnet50),
        Arch(
            "densenet121", "DenseNet-121 (3x3 stem, no pool at 32 px)", torchvision_nets.densenet121
        ),
        Arch("mobilenetv2", "MobileNetV2 (stride-1 stem at 32 px)", torchvision_nets.mobilenet_v2),
        Arch(
            "fast-resnet",
            "ResNet-9 of a chosen width: the CPU protocol's net",
            fast_resnet.fast_resnet,
        ),
    ],
)


def build_model(arch: str, num_classes: int, image_size: int, **options: Any) -> nn.Module:
    """Build `arch` for `num_classes` classes of `image_size` px images."""
    return ARCHS.get(arch, key="arch").build(num_classes, image_size, **options)
