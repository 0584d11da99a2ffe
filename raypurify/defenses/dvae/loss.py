"""The D-VAE objective (paper Eq. 14) with the authors' reductions, and Eq. 3 without D_p.

    L = MSE(x_hat, x) + MSE(clip(x_hat + p_hat, 0, 1), x) + lambda * max(KL, kld_limit)
        [+ w * max(mean(p_hat^2), floor) from `phat_start_epoch` on]

MSEs are means over all elements; KL is summed over latent channels and averaged over the
batch and latent positions (nats per latent location). The max() is a hinge: below the
limit the KL term is constant, so it has no gradient and the KL settles at the limit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .config import StageConfig


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) per latent location: sum over channels, mean elsewhere."""
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.sum(dim=1).mean()


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean PSNR (dB) between two batches of images in [0, 1]."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()


def dvae_loss(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    p_hat: torch.Tensor | None,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    kld_limit: float,
    kl_weight: float,
    phat_weight: float = 0.0,
    phat_floor: float = 0.002,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 14 (Eq. 3 when p_hat is None); returns (loss, its terms for logging)."""
    kl = kl_divergence(mu, logvar)
    terms = {"rec": F.mse_loss(x_hat, x), "kl": kl}
    loss = terms["rec"] + kl_weight * torch.clamp(kl, min=kld_limit)
    if p_hat is not None:
        terms["rec_p"] = F.mse_loss(torch.clamp(x_hat + p_hat, 0.0, 1.0), x)
        terms["p_energy"] = p_hat.pow(2).mean()
        loss = loss + terms["rec_p"]
        if phat_weight > 0:
            loss = loss + phat_weight * torch.clamp(terms["p_energy"], min=phat_floor)
    return loss, terms


def stage_loss(
    stage: StageConfig,
    epoch: int,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    p_hat: torch.Tensor | None,
    mu: torch.Tensor,
    logvar: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`dvae_loss` with `stage`'s rate cap, lambda and p_hat floor at `epoch` (0-based): the
    p_hat hinge weighs in from the stage's `phat_start_epoch` on."""
    return dvae_loss(
        x,
        x_hat,
        p_hat,
        mu,
        logvar,
        kld_limit=stage.kld_limit,
        kl_weight=stage.kl_weight,
        phat_weight=stage.phat_weight if epoch >= stage.phat_start_epoch else 0.0,
        phat_floor=stage.phat_floor,
    )
