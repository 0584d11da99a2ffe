"""D-VAE (Yu et al., ICML 2024): a rate-constrained VAE with a second, perturbation decoder.

    x --Encoder--> h --1x1--> (mu, log sigma^2)      spatial latent, `latent` channels
    z = mu + sigma * eps                              (z = mu for deterministic purification)
    x_hat = D(post_conv(z))                           reconstruction, Sigmoid output
    p_hat = D_p(post_conv(z) + u_y)                   the poison, linear output

With the KL term capped (Eq. 14), z cannot afford the poison's bits, so x_hat comes out
clean and D_p, told the class through the learned embedding u_y, learns the poison itself.
For 32 px images this is the authors' network (about 1.18 M parameters for 10 classes):
a CIFAR ResNet-18 stem and first stages as encoder, a 16 x 16 latent grid. Larger images
add stride-2 stages until the grid is at most 16 px (64 px: 2 stages, 224 px: 4 -> 14 px);
`latent_grid` sets another cap (8: an 8 x 8 grid at 32 px).
Without D_p (`perturbation_decoder=False`) this is the plain VAE of Eq. 3.
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
import torch.nn as nn

from raypurify.models.resnet import BasicBlock


def downsampling_stages(image_size: int, max_grid: int = 16) -> int:
    """Stride-2 stages needed to bring `image_size` down to at most `max_grid` (>= 1)."""
    return max(1, math.ceil(math.log2(image_size / max_grid)))


class Encoder(nn.Module):
    """3x3 stem, two width-w BasicBlocks at full resolution, then stride-2 2w blocks."""

    def __init__(self, width: int, stages: int):
        super().__init__()
        w = width
        layers = [
            nn.Conv2d(3, w, 3, 1, 1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            BasicBlock(w, w),
            BasicBlock(w, w),
        ]
        layers += [BasicBlock(w if i == 0 else 2 * w, 2 * w, stride=2) for i in range(stages)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


DecoderNorm = Literal["instance", "batch"]


def norm_layer(kind: DecoderNorm, channels: int) -> nn.Module:
    """The decoder's normalisation.

    `instance` is the authors' (InstanceNorm without affine parameters, written as GroupNorm
    with one group per channel: the same function, but its CPU kernel keeps channels_last
    and runs about twice as fast). It takes each image's own mean and scale out of every
    channel at 32 px, so the colour and brightness of the whole image must be rebuilt by
    the last convolutions, which a short run does not learn. `batch` (BatchNorm) keeps them:
    after 3 epochs on 2,000 training images it reconstructs held-out ones at 21.8 dB
    against 18.1 dB with `instance` (docs/dvae.md, "The decoder norm").
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(channels, channels, affine=False)


def decoder(
    width: int, stages: int, out_activation: nn.Module | None, norm: DecoderNorm = "instance"
) -> nn.Sequential:
    """Transposed convs back to full resolution (the authors' layer sequence at 32 px)."""
    w = width
    layers: list[nn.Module] = [nn.ConvTranspose2d(2 * w, 2 * w, 4, 2, 1) for _ in range(stages - 1)]
    layers += [
        nn.ConvTranspose2d(2 * w, w, 4, 2, 1),
        nn.ConvTranspose2d(w, w, 3, 1, 1),
        norm_layer(norm, w),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(w, w // 2, 3, 1, 1),
        norm_layer(norm, w // 2),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(w // 2, 3, 3, 1, 1),
    ]
    if out_activation is not None:
        layers.append(out_activation)
    return nn.Sequential(*layers)


class DVAE(nn.Module):
    def __init__(
        self,
        num_classes: int,
        image_size: int = 32,
        width: int = 64,
        latent: int = 256,
        perturbation_decoder: bool = True,
        phat_zero_init: bool = False,
        decoder_norm: DecoderNorm = "instance",
        latent_grid: int = 16,
    ):
        super().__init__()
        stages = downsampling_stages(image_size, latent_grid)
        self.grid = math.ceil(image_size / 2**stages)
        self.hidden = 2 * width
        self.encoder = Encoder(width, stages)
        self.to_mu = nn.Conv2d(self.hidden, latent, 1)
        self.to_logvar = nn.Conv2d(self.hidden, latent, 1)
        self.post_conv = nn.Conv2d(latent, self.hidden, 1)
        self.decoder = decoder(width, stages, nn.Sigmoid(), decoder_norm)
        self.perturbation_decoder: nn.Sequential | None = None
        if perturbation_decoder:
            self.perturbation_decoder = decoder(width, stages, None, decoder_norm)
            if phat_zero_init:  # p_hat = 0 at the start; gradients still reach the layer
                # Module attributes are typed Tensor | Module; a conv's are tensors.
                nn.init.zeros_(cast(torch.Tensor, self.perturbation_decoder[-1].weight))
                nn.init.zeros_(cast(torch.Tensor, self.perturbation_decoder[-1].bias))
            self.class_embedding = nn.Embedding(num_classes, self.hidden * self.grid**2)

    def param_groups(self, lr: float, phat_scale: float, embedding_scale: float) -> list[dict]:
        """Optimizer groups: D_p at lr * phat_scale, u_y at lr * embedding_scale, the rest at lr."""
        scales = {"perturbation_decoder": phat_scale, "class_embedding": embedding_scale}
        groups: dict[float, list[nn.Parameter]] = {}
        for name, param in self.named_parameters():
            groups.setdefault(lr * scales.get(name.split(".")[0], 1.0), []).append(param)
        return [{"params": params, "lr": group_lr} for group_lr, params in groups.items()]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        # A contiguous draw: randn_like on a channels_last tensor is ~8x slower on CPU.
        eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device)
        return mu + eps * torch.exp(0.5 * logvar)

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """x_hat = D(post_conv(z)), in [0, 1]."""
        return self.decoder(self.post_conv(z))

    def perturbation(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """p_hat = D_p(post_conv(z) + u_y), unbounded."""
        u = self.class_embedding(y).view(-1, self.hidden, self.grid, self.grid)
        # Only called on a D-VAE built with its perturbation decoder.
        return cast(nn.Sequential, self.perturbation_decoder)(self.post_conv(z) + u)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, sample: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(x_hat, p_hat or None, mu, logvar) for a training step."""
        mu, logvar = self.encode(x)
        z = self.sample(mu, logvar) if sample else mu
        h = self.post_conv(z)
        x_hat = self.decoder(h)
        p_hat = None
        if self.perturbation_decoder is not None:
            u = self.class_embedding(y).view(-1, self.hidden, self.grid, self.grid)
            p_hat = self.perturbation_decoder(h + u)
        return x_hat, p_hat, mu, logvar
