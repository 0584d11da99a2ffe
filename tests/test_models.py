"""Every registered classifier architecture builds for 32 and 64 px images, gives one logit
per class and trains; at 32 px the ImageNet stems are adapted so that the first blocks see
the whole image, and at 64 px and above they are the ImageNet models unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from raypurify.errors import ConfigError
from raypurify.models import ARCHS, build_model

# The nets that come with an ImageNet stem (a stride-2 convolution, and for some a pool).
IMAGENET_STEMS = {"resnet18", "resnet50", "densenet121", "mobilenetv2"}


def full_resolution_convs(model: nn.Module, size: int) -> tuple[torch.Tensor, int]:
    """The model's logits for two random images, and how many of its convolutions ran at
    the input's own resolution."""
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: sizes.append(out.shape[-1]))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        logits = model(torch.rand(2, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    return logits, sum(s == size for s in sizes)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("arch", ARCHS.names())
def test_every_architecture_gives_a_logit_per_class_and_trains(arch, size):
    torch.manual_seed(0)
    model = build_model(arch, 7, size)
    logits, _ = full_resolution_convs(model, size)
    assert logits.shape == (2, 7)
    nn.functional.cross_entropy(logits, torch.tensor([0, 6])).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("arch", ARCHS.names())
def test_small_images_keep_their_resolution_into_the_first_blocks(arch):
    """An unadapted ImageNet stem would take a 32 px image to 16 or 8 px before any block."""
    _, at_full = full_resolution_convs(build_model(arch, 10, 32).eval(), 32)
    assert at_full >= 2, f"{arch}: {at_full} convolutions at 32 px"


@pytest.mark.parametrize("arch", sorted(IMAGENET_STEMS))
def test_larger_images_get_the_imagenet_stem(arch):
    _, at_full = full_resolution_convs(build_model(arch, 10, 64).eval(), 64)
    assert at_full == 0, f"{arch}: {at_full} convolutions at 64 px"


def test_an_unknown_architecture_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"^arch: unknown architecture 'vgg' \(known: resnet18"):
        build_model("vgg", 10, 32)
