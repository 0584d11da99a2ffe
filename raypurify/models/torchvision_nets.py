"""DenseNet-121 and MobileNetV2 from torchvision, with stems adapted to 32 px images.

The ImageNet stems downsample 4x before the first block (DenseNet) or 2x twice early
(MobileNetV2), which leaves too little of a 32 px image; the usual CIFAR adaptation keeps
the early resolution. For 64 px and larger images the ImageNet models are used unchanged.
torchvision is imported where a model is built: importing its model zoo costs every Ray
worker about a second (it pulls in torch._dynamo), and most runs never use it.
"""

from __future__ import annotations

import torch.nn as nn


def densenet121(num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import densenet

    model = densenet.densenet121(num_classes=num_classes)
    if image_size <= 32:
        model.features.conv0 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.features.pool0 = nn.Identity()
    return model


def mobilenet_v2(num_classes: int, image_size: int) -> nn.Module:
    from torchvision.models import mobilenetv2

    model = mobilenetv2.mobilenet_v2(num_classes=num_classes)
    if image_size <= 32:
        model.features[0][0].stride = (1, 1)  # stem: 32 -> 32 instead of 32 -> 16
        model.features[2].conv[1][0].stride = (1, 1)  # first stride-2 block kept at 32 px
    return model
