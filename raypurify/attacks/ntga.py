"""NTGA, the neural tangent generalization attack (Yuan & Wu, ICML 2021), with the
authors' fully-connected surrogate.

No network is trained. The surrogate is the infinite-width limit of `depth` Dense + erf
layers (weight variance 1.76, bias variance 0.18), whose neural tangent kernel Θ gives in
closed form what gradient descent on the squared loss predicts after time t when trained
on a block X of the poisoned images with one-hot labels Y (Lee et al., 2019):

    f_t(X_val) = Θ(X_val, X) Θ(X, X)^-1 (I - exp(-t Θ(X, X) / (n K))) Y

(n rows, K classes; Θ(X, X) regularised by `diag_reg` times its mean diagonal). PGD moves
the block's images within the l_inf ball to *raise* the cross-entropy of f_t on clean
validation images, so that what is learnt from them generalises badly. The rows are
shuffled into blocks of `block_size` (the authors' B-NTGA), each attacked on its own in a
Ray task; the validation images are `val_size` clean rows drawn from the whole set. (The
authors hold 10,000 CIFAR-10 training images out of the poisoned set for validation and
poison the other 40,000; a poison of every row, as the tables use, draws them from the
rows it poisons.) The authors' settings are the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt

from raypurify.attacks.base import Attack, AttackJob, EpsConfig, perturb
from raypurify.progress import BarQueue, Progress, add


class NTGAConfig(EpsConfig):
    eps: float = Field(8 / 255, gt=0, le=1, description="l_inf bound, [0, 1] units")
    steps: PositiveInt = 10
    step_size: float | None = Field(None, gt=0, description="default: 1.1 * eps / steps")
    t: float = Field(64.0, gt=0, description="gradient-descent time the kernel predicts at")
    block_size: PositiveInt = Field(512, description="rows attacked together (one Ray task)")
    val_size: PositiveInt = Field(10_000, description="clean rows the prediction is scored on")
    depth: PositiveInt = Field(5, description="Dense + erf layers of the surrogate")
    weight_var: float = Field(1.76, gt=0, description="the surrogate's weight variance")
    bias_var: float = Field(0.18, ge=0, description="the surrogate's bias variance")
    diag_reg: float = Field(1e-4, ge=0, description="ridge, relative to the mean diagonal")


def erf_kernels(
    a: torch.Tensor, b: torch.Tensor, depth: int, w_var: float, b_var: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, Θ): the covariance and the tangent kernel of `depth` infinite Dense + erf
    layers between flattened inputs a (n, d) and b (m, d), in their dtype. Each layer maps
    the covariance K of its input to that of its pre-activations, W K + B, then through
    erf (Williams, 1997), and the tangent kernel along: Θ <- erf'-covariance * (W Θ +
    K_pre). Every arcsine argument stays below 2K/(1 + 2K) < 1, so float32 is safe where
    no system is solved."""
    d = a.shape[1]
    k_ab = a @ b.T / d
    k_a = a.square().sum(1) / d
    k_b = b.square().sum(1) / d
    theta = torch.zeros_like(k_ab)
    for _ in range(depth):
        k_ab, k_a, k_b = w_var * k_ab + b_var, w_var * k_a + b_var, w_var * k_b + b_var
        theta = w_var * theta + k_ab
        scale = torch.outer(1 + 2 * k_a, 1 + 2 * k_b)
        theta = theta * (4 / math.pi) / torch.sqrt(scale - 4 * k_ab.square())
        k_ab = (2 / math.pi) * torch.asin(2 * k_ab / torch.sqrt(scale))
        k_a = (2 / math.pi) * torch.asin(2 * k_a / (1 + 2 * k_a))
        k_b = (2 / math.pi) * torch.asin(2 * k_b / (1 + 2 * k_b))
    return k_ab, theta


def predict(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, cfg: NTGAConfig) -> torch.Tensor:
    """f_t(x_val) of the kernel machine trained on (x, one-hot y) for time t: the block's
    system in float64 (the authors' precision), the validation rows' kernel in float32."""
    kernel = (cfg.depth, cfg.weight_var, cfg.bias_var)
    theta = erf_kernels(x.double(), x.double(), *kernel)[1]
    eye = torch.eye(len(x), dtype=theta.dtype, device=theta.device)
    theta = theta + cfg.diag_reg * theta.diagonal().mean() * eye
    decay = torch.linalg.matrix_exp(-cfg.t / y.numel() * theta)
    coef = torch.linalg.solve(theta, (eye - decay) @ y)
    return erf_kernels(x_val, x, *kernel)[1].double() @ coef


@dataclass(frozen=True)
class NTGABlock:
    """One Ray task's share: its block of rows, and the validation rows every block is
    attacked against (object refs, put once for all blocks)."""

    images: np.ndarray  # uint8 (n, H, W, C), the block's rows to poison
    labels: np.ndarray  # int64 (n,)
    val_images: Any  # ref: uint8 (m, H, W, C), clean
    val_labels: Any  # ref: int64 (m,)
    classes: int
    cfg: NTGAConfig
    progress: BarQueue | None


def craft_block(spec: NTGABlock) -> np.ndarray:
    """PGD on one block (no random start, the authors' choice): the float perturbation
    (len(block), H, W, C) in [0, 1] units."""
    cfg = spec.cfg
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The object store's arrays are read-only: torch.tensor copies them.
    x0 = torch.tensor(spec.images, device=dev).flatten(1).float() / 255
    y = F.one_hot(torch.tensor(spec.labels), spec.classes).double().to(dev)
    x_val = torch.tensor(ray.get(spec.val_images), device=dev).flatten(1).float() / 255
    y_val = torch.tensor(ray.get(spec.val_labels), device=dev)
    step_size = cfg.step_size or 1.1 * cfg.eps / cfg.steps
    delta = torch.zeros_like(x0)
    for _ in range(cfg.steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(predict((x0 + delta).clamp(0, 1), y, x_val, cfg), y_val)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * grad.sign()).clamp(-cfg.eps, cfg.eps)
        delta = (x0 + delta).clamp(0, 1) - x0
    add(spec.progress, len(spec.labels))
    return delta.reshape(spec.images.shape).cpu().numpy()


def generate(job: AttackJob, cfg: NTGAConfig) -> np.ndarray:
    from raypurify.distributed import use_gpu
    from raypurify.runtime import init_ray

    init_ray()
    rng = np.random.default_rng(cfg.seed)
    val = rng.choice(len(job.clean), min(cfg.val_size, len(job.clean)), replace=False)
    order = rng.permutation(len(job.rows))
    blocks = [order[s : s + cfg.block_size] for s in range(0, len(order), cfg.block_size)]
    val_refs = {
        "val_images": ray.put(job.clean.images[val]),
        "val_labels": ray.put(job.clean.labels[val]),
    }
    # Wrapped here, not by a decorator: the module then holds the plain function, which Ray
    # pickles by reference.
    gpu = use_gpu("auto")
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(craft_block)
    delta = np.zeros(job.rows.images.shape, np.float32)
    with Progress(len(job.rows), f"NTGA crafting ({len(blocks)} blocks)", unit="img") as bar:
        specs = [
            NTGABlock(job.rows.images[b], job.rows.labels[b], **val_refs,
                      classes=job.clean.num_classes, cfg=cfg, progress=bar.queue)
            for b in blocks
        ]  # fmt: skip
        for block, part in zip(blocks, ray.get([task.remote(s) for s in specs]), strict=True):
            delta[block] = part
    return perturb(job.rows.images, lambda rows: torch.from_numpy(delta[rows]), "linf", cfg.eps,
                   job.device)  # fmt: skip


ATTACK = Attack(
    name="ntga",
    description="neural tangent generalization attack (Yuan & Wu 2021), l_inf 8/255",
    norm="linf",
    config=NTGAConfig,
    generate=generate,
)
