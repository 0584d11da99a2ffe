"""REM, robust error-minimising noise (Fu et al., ICLR 2022).

    min_theta min_{||du|| <= eps} E_T max_{||da|| <= adv_eps} CE(f(T(x + du) + da), y)

EM's min-min made robust to adversarial training: the surrogate is trained adversarially
(PGD of radius `adv_eps` around the augmented noisy images), and the defensive noise du
descends the loss *after* that inner attack, averaged over `eot` random crops/flips T
(expectation over transformation). Each PGD step on du costs eot * (adv_steps + 1)
forward-backward passes, so full-size runs (the authors' 5000 steps) need a GPU; the
settings scale the cost. The rounds machinery (Ray Train, row sharding, all-reduced
noise) is EM's.
"""

from __future__ import annotations

from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from raypurify.attacks.base import Attack, AttackJob
from raypurify.attacks.em import EMConfig, MinMin, _input_grad, run_minmin
from raypurify.runtime import autocast
from raypurify.training.augment import crop_flip


class REMConfig(EMConfig):
    granularity: Literal["sample"] = "sample"
    step_size: float = Field(1.6 / 255, gt=0, description="defensive PGD step")
    pgd_steps: PositiveInt = 10
    adv_eps: float = Field(4 / 255, ge=0, description="adversarial training radius")
    adv_steps: PositiveInt = 10
    adv_step_size: float = Field(0.8 / 255, gt=0)
    eot: PositiveInt = Field(5, description="augmentations averaged per noise step")
    stop_error: float = Field(0.0, ge=0, lt=1, description="0: run all max_rounds")
    max_rounds: PositiveInt = 50


class RobustMinMin(MinMin):
    cfg: REMConfig  # MinMin.__init__ sets it (run_minmin passes REM's config)

    def attack(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD ascent of radius adv_eps around x (the inner max)."""
        cfg = self.cfg
        if cfg.adv_eps == 0:
            return x
        rand = torch.rand(x.shape, generator=self.gen).to(x.device)
        da = (2 * rand - 1) * cfg.adv_eps
        for _ in range(cfg.adv_steps):
            g = _input_grad(net, x, da, y, self.amp)
            da = torch.clamp(da + cfg.adv_step_size * g.sign(), -cfg.adv_eps, cfg.adv_eps)
            da = torch.clamp(x + da, 0, 1) - x
        return torch.clamp(x + da, 0, 1).detach()

    def train_batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Adversarial training examples: attack the augmented noisy images."""
        noisy = crop_flip(torch.clamp(self.x[idx] + self.noise(idx), 0, 1), self.gen)
        net = cast(
            torch.nn.Module, self.model.module if hasattr(self.model, "module") else self.model
        )
        was_training = net.training
        net.eval()
        adv = self.attack(net, noisy, self.y[idx])
        net.train(was_training)
        return adv.contiguous(memory_format=torch.channels_last)

    def sample_update(self, net: torch.nn.Module) -> torch.Tensor:
        """Defensive PGD descent on du, through the inner attack, averaged over EOT."""
        cfg, update = self.cfg, torch.zeros_like(self.delta)
        for i in range(0, len(self.mine), self.bs):
            idx = self.mine[i : i + self.bs]
            x, y, d = self.x[idx], self.y[idx], self.delta[idx]
            for _ in range(cfg.pgd_steps):
                grad = torch.zeros_like(d)
                for _ in range(cfg.eot):
                    d_ = d.detach().requires_grad_(True)
                    seen = crop_flip(torch.clamp(x + d_, 0, 1), self.gen)
                    da = (self.attack(net, seen.detach(), y) - seen).detach()  # Danskin
                    with autocast(self.dev, self.amp):
                        adv = (seen + da).contiguous(memory_format=torch.channels_last)
                        loss = F.cross_entropy(net(adv).float(), y)
                    grad += torch.autograd.grad(loss, d_)[0]
                d = torch.clamp(d - cfg.step_size * grad.sign(), -cfg.eps, cfg.eps)
                d = torch.clamp(x + d, 0, 1) - x
            update[idx] = d - self.delta[idx]
        return update


def generate(job: AttackJob, cfg: REMConfig) -> np.ndarray:
    return run_minmin(job, cfg, RobustMinMin, "REM (rounds)")


ATTACK = Attack(
    name="rem",
    description="robust error-minimising noise (Fu et al. 2022), l_inf 8/255, AT radius 4/255",
    norm="linf",
    config=REMConfig,
    generate=generate,
)
