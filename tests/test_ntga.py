"""NTGA: the closed-form kernel is the one a wide network has, and the attack, on real
CIFAR-10 images through real Ray tasks, keeps the budget and raises the loss it attacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_surrogate_attacks import RATIO, check_linf_poison

from raypurify.attacks.base import poison
from raypurify.attacks.ntga import NTGAConfig, erf_kernels, predict

NTGA_TINY = {"steps": 4, "block_size": 50, "val_size": 100, "ratio": RATIO}
W_VAR, B_VAR = NTGAConfig().weight_var, NTGAConfig().bias_var  # the authors' surrogate
W_STD, B_STD = math.sqrt(W_VAR), math.sqrt(B_VAR)


def empirical_ntk(a: torch.Tensor, b: torch.Tensor, width: int, depth: int, seed: int):
    """The tangent kernel of one finite network, `depth` Dense + erf layers of `width`
    units and a one-unit Dense readout, in the NTK parameterisation: the sum over every
    weight and bias of d f(a) / d theta * d f(b) / d theta."""
    gen = torch.Generator().manual_seed(seed)
    widths = [a.shape[1]] + [width] * depth + [1]
    params = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
        params += [torch.randn(fan_in, fan_out, generator=gen, dtype=torch.float64),
                   torch.randn(fan_out, generator=gen, dtype=torch.float64)]  # fmt: skip
    for p in params:
        p.requires_grad_(True)

    def net(x: torch.Tensor) -> torch.Tensor:
        for k, (w, bias) in enumerate(zip(params[::2], params[1::2], strict=True)):
            x = W_STD / math.sqrt(w.shape[0]) * x @ w + B_STD * bias
            x = torch.erf(x) if k < depth else x
        return x[:, 0]

    def grads(x: torch.Tensor) -> torch.Tensor:
        out = net(x)
        return torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
            out[i], params, retain_graph=True)]) for i in range(len(x))])  # fmt: skip

    return grads(a) @ grads(b).T


@pytest.mark.parametrize("depth", [1, 3])
def test_the_erf_kernel_is_a_wide_networks_tangent_kernel(depth):
    """A readout on the surrogate has tangent kernel W (Θ + K) + B in the infinite-width
    limit; one network 2,048 units wide comes within a few percent of it."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 12, generator=gen, dtype=torch.float64)
    b = torch.rand(2, 12, generator=gen, dtype=torch.float64)
    nngp, ntk = erf_kernels(a, b, depth, W_VAR, B_VAR)
    exact = W_VAR * (ntk + nngp) + B_VAR
    wide = empirical_ntk(a, b, width=2048, depth=depth, seed=1)
    assert torch.allclose(wide, exact, rtol=0.1), (wide, exact)
    # and not just any kernel of that size: one layer more or less is told apart
    other_nngp, other_ntk = erf_kernels(a, b, depth + 1, W_VAR, B_VAR)
    assert not torch.allclose(wide, W_VAR * (other_ntk + other_nngp) + B_VAR, rtol=0.1)


def test_the_prediction_is_kernel_regression_at_long_times():
    """At t -> infinity, gradient descent on the squared loss interpolates the training
    labels: f_t(X) = Y on the block itself."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 20, generator=gen, dtype=torch.float64)
    y = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).double()
    fitted = predict(x, y, x, NTGAConfig(t=1e7, diag_reg=0))
    assert torch.allclose(fitted, y, atol=1e-4)
    early = predict(x, y, x, NTGAConfig(t=1.0, diag_reg=0))
    assert early.abs().max() < 0.5  # barely trained


def test_ntga_keeps_the_budget_and_raises_the_loss_it_attacks(ray_session, clean):
    poisoned, budget = poison(clean, "ntga", settings=NTGA_TINY)
    check_linf_poison(clean, poisoned, budget)
    again, _ = poison(clean, "ntga", settings=NTGA_TINY)
    assert np.array_equal(again.images, poisoned.images)  # the same seed, the same poison

    # The kernel machine trained on the poisoned rows generalises worse to clean images
    # than trained on them clean, by far more than uniform noise of the same l_inf budget
    # on the same rows does: the objective PGD raised.
    noise, _ = poison(clean, "random-noise", settings={"ratio": RATIO})
    cfg = NTGAConfig(**{k: v for k, v in NTGA_TINY.items() if k != "ratio"})
    rows = np.flatnonzero(poisoned.poisoned)
    assert np.array_equal(np.flatnonzero(noise.poisoned), rows)

    def val_loss(images: np.ndarray) -> float:
        x = torch.from_numpy(images[rows]).flatten(1).double() / 255
        y = F.one_hot(torch.from_numpy(clean.labels[rows]), 10).double()
        x_val = torch.from_numpy(clean.images).flatten(1).double() / 255
        logits = predict(x, y, x_val, cfg)
        return float(F.cross_entropy(logits, torch.from_numpy(clean.labels)))

    base = val_loss(clean.images)
    assert val_loss(poisoned.images) - base > 10 * (val_loss(noise.images) - base) > 0


@pytest.fixture(scope="module")
def clean(cifar10_dir):
    from raypurify.data.registry import load
    from raypurify.data.spec import DatasetSpec

    return load(DatasetSpec(name="cifar10", path=str(cifar10_dir), subset=200, seed=11))
