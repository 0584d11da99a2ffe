"""D-VAE model and loss: the paper's shapes and parameter count, the KL hinge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raypurify.defenses.dvae.loss import dvae_loss, kl_divergence, psnr
from raypurify.defenses.dvae.model import DVAE, downsampling_stages


def trained_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_paper_configuration_has_the_authors_size():
    # docs/dvae.md: about 1.18 M trained parameters for 10 classes, 4.13 M for 100.
    assert trained_parameters(DVAE(10)) == pytest.approx(1.18e6, rel=0.005)
    assert trained_parameters(DVAE(100)) == pytest.approx(4.13e6, rel=0.005)


def test_plain_vae_has_no_perturbation_decoder_or_embedding():
    vae = DVAE(10, perturbation_decoder=False)
    names = {n for n, _ in vae.named_parameters()}
    assert not any(n.startswith(("perturbation_decoder", "class_embedding")) for n in names)
    x_hat, p_hat, _, _ = vae(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    assert p_hat is None and x_hat.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("size,grid", [(32, 16), (64, 16), (224, 14)])
def test_shapes_at_each_image_size(size, grid):
    model = DVAE(10, image_size=size, width=16, latent=32)
    x = torch.rand(2, 3, size, size)
    x_hat, p_hat, mu, logvar = model(x, torch.tensor([3, 7]))
    assert x_hat.shape == p_hat.shape == x.shape
    assert mu.shape == logvar.shape == (2, 32, grid, grid)
    assert downsampling_stages(size) == {32: 1, 64: 2, 224: 4}[size]
    # D has a Sigmoid output, D_p is linear (p_hat may be negative).
    assert float(x_hat.detach().min()) >= 0.0 and float(x_hat.detach().max()) <= 1.0


@pytest.mark.parametrize("size,latent_grid,grid", [(32, 8, 8), (64, 8, 8), (32, 32, 16)])
def test_a_coarser_latent_grid_adds_stages(size, latent_grid, grid):
    """`model.latent_grid` caps the grid's side; at least one stage stays (32 px: 16, not 32)."""
    model = DVAE(10, image_size=size, width=8, latent=16, latent_grid=latent_grid)
    x = torch.rand(2, 3, size, size)
    x_hat, p_hat, mu, _ = model(x, torch.tensor([1, 2]))
    assert x_hat.shape == p_hat.shape == x.shape
    assert mu.shape == (2, 16, grid, grid) and model.grid == grid


def test_class_embedding_changes_only_the_perturbation():
    torch.manual_seed(0)
    model = DVAE(10, width=16, latent=32).eval()
    x = torch.rand(1, 3, 32, 32)
    a = model(x, torch.tensor([0]), sample=False)
    b = model(x, torch.tensor([5]), sample=False)
    assert torch.equal(a[0], b[0])  # x_hat does not see the label
    assert not torch.allclose(a[1], b[1])  # p_hat does


def test_zero_started_perturbation_decoder_outputs_nothing_yet_learns():
    torch.manual_seed(0)
    model = DVAE(10, width=16, latent=32, phat_zero_init=True)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    _, p_hat, _, _ = model(x, y, sample=False)
    assert torch.count_nonzero(p_hat) == 0
    p_hat.sub(torch.rand_like(p_hat)).pow(2).mean().backward()
    assert model.perturbation_decoder[-1].weight.grad.abs().sum() > 0  # not stuck at zero


def test_batch_norm_decoders_are_built_on_request_and_purify_batch_independently():
    norms = {
        kind: {type(m) for m in DVAE(10, width=16, latent=32, decoder_norm=kind).modules()}
        for kind in ("instance", "batch")
    }
    assert torch.nn.GroupNorm in norms["instance"]  # the authors' instance norm
    assert torch.nn.GroupNorm not in norms["batch"]
    torch.manual_seed(0)
    model = DVAE(10, width=16, latent=32, decoder_norm="batch")
    x, y = torch.rand(8, 3, 32, 32), torch.arange(8)
    model(x, y)[0].mean().backward()  # a training step moves the running statistics
    model.eval()
    with torch.no_grad():  # purification: an image's output must not depend on its batch
        together = model(x, y, sample=False)
        alone = model(x[:1], y[:1], sample=False)
    assert torch.allclose(together[0][:1], alone[0], atol=1e-6)
    assert torch.allclose(together[1][:1], alone[1], atol=1e-6)


def test_param_groups_give_each_part_its_learning_rate():
    model = DVAE(10, width=16, latent=32)
    groups = model.param_groups(1e-3, phat_scale=0.5, embedding_scale=4.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert len(lr_of) == len(list(model.parameters()))  # every parameter, once
    assert lr_of[id(model.class_embedding.weight)] == pytest.approx(4e-3)
    assert lr_of[id(model.perturbation_decoder[0].weight)] == pytest.approx(5e-4)
    assert lr_of[id(model.encoder.net[0].weight)] == pytest.approx(1e-3)
    assert len(DVAE(10, width=16, latent=32).param_groups(1e-3, 1.0, 1.0)) == 1


def kl_gradient(mu: torch.Tensor, limit: float) -> torch.Tensor:
    mu = mu.clone().requires_grad_(True)
    logvar = torch.zeros_like(mu)
    x = torch.rand(2, 3, 4, 4)
    loss, _ = dvae_loss(x, x.clone(), None, mu, logvar, kld_limit=limit, kl_weight=0.01)
    loss.backward()
    return mu.grad


def test_kl_hinge_has_no_gradient_below_the_limit_and_some_above():
    mu = torch.full((2, 8, 4, 4), 0.1)  # KL = 8 * 0.005 = 0.04 nats per location
    assert float(kl_divergence(mu, torch.zeros_like(mu))) == pytest.approx(0.04)
    assert torch.count_nonzero(kl_gradient(mu, limit=1.0)) == 0
    above = kl_gradient(mu, limit=0.01)
    assert torch.count_nonzero(above) == above.numel()


def test_loss_terms_follow_eq_14():
    x = torch.rand(2, 3, 8, 8)
    x_hat = torch.full_like(x, 0.5)
    p_hat = x - x_hat  # a perfect perturbation decoder
    mu, logvar = torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    loss, terms = dvae_loss(
        x,
        x_hat,
        p_hat,
        mu,
        logvar,
        kld_limit=1.0,
        kl_weight=0.01,
        phat_weight=1.0,
        phat_floor=0.002,
    )
    assert float(terms["rec_p"]) == pytest.approx(0.0, abs=1e-12)
    expected = terms["rec"] + 0.01 * 1.0 + max(float(terms["p_energy"]), 0.002)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(psnr(x, x)) > 90


@pytest.mark.parametrize("draw_name", ["row_normal", "block_normal"])
def test_sampled_noise_depends_on_the_row_not_its_batch(draw_name):
    """A sampled pass's z noise: the same row index gets the same noise whichever batch it
    arrives in (Ray Data batches as it likes), different rows get different noise, and the
    draws are N(0, 1). block_normal is the GPU draw, run here on the CPU device."""
    from raypurify.defenses.dvae import passes

    draw = getattr(passes, draw_name)
    cpu, shape = torch.device("cpu"), (4, 3, 3)
    rows = np.arange(200, 900)  # crosses NOISE_BLOCK boundaries
    whole = draw(7, rows, shape, cpu)
    split = torch.cat([draw(7, part, shape, cpu) for part in np.array_split(rows[::-1], 5)])
    assert torch.equal(whole, split.flip(0))
    assert not torch.equal(whole[0], whole[1])
    assert not torch.equal(whole, draw(8, rows, shape, cpu))  # the seed matters
    assert abs(whole.mean().item()) < 0.05 and abs(whole.std().item() - 1) < 0.05


def test_gpu_actors_share_the_gpus_they_outnumber():
    from raypurify.defenses.dvae.passes import gpu_share

    assert gpu_share(1, gpus=1) == 1.0 and gpu_share(4, gpus=8) == 1.0
    assert gpu_share(2, gpus=1) == 0.5 and gpu_share(3, gpus=1) == pytest.approx(1 / 3)
    for actors, gpus in [(3, 2), (6, 4), (5, 2), (7, 3)]:  # every actor fits on some GPU
        share = gpu_share(actors, gpus)
        assert gpus * int(1 / share + 1e-9) >= actors and share * actors <= gpus + 1e-9
