"""D-VAE stages trained and applied in process, for probes that measure a stage's output
quickly (no Ray, no store): the same model, loss, optimiser groups and cosine schedule as the
pipeline's stage (defenses/dvae/stage.py), on ready tensors."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import read_images
from raypurify.defenses.dvae.config import PurifyConfig, StageConfig, preset
from raypurify.defenses.dvae.loss import stage_loss
from raypurify.defenses.dvae.model import DVAE
from raypurify.defenses.dvae.stage import build, cosine
from raypurify.runtime import autocast, device, use_bf16

DEV = device()  # the GPU when there is one


def positions(data: ImageSet, index: np.ndarray) -> np.ndarray:
    """The positions in `data` of the rows whose index is `index`, in that order."""
    order = np.argsort(data.index)
    return order[np.searchsorted(data.index[order], index)]


def by_index(data: ImageSet, index: np.ndarray) -> np.ndarray:
    """The images of `data` whose index is `index`, in that order."""
    return data.images[positions(data, index)]


def probe_split(rows: int, train: int, held: int) -> tuple[np.ndarray, np.ndarray]:
    """The probes' training and held-out rows among `rows` (positions, seed 0)."""
    order = np.random.default_rng(0).permutation(rows)
    return order[:train], order[train : train + held]


def probe_parser(doc: str) -> argparse.ArgumentParser:
    """The options every probe takes: the poison, its clean originals, the rows, the preset
    and the result file's label."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--poison", required=True, help="a poisoned dataset (interchange format)")
    ap.add_argument("--clean", required=True, help="the clean dataset it was made from")
    ap.add_argument("--rows", type=int, default=2500)
    ap.add_argument("--held", type=int, default=1000)
    ap.add_argument("--preset", default="cpu", help="the purification preset to train")
    ap.add_argument("--set", action="append", default=[], help="override the preset")
    ap.add_argument("--label", help="the result file's variant name")
    return ap


@dataclass
class Probe:
    """A probe's inputs: the preset, the poisoned set, each row's clean original, and the
    positions of the training and held-out rows."""

    cfg: PurifyConfig
    poisoned: ImageSet
    originals: np.ndarray
    train: np.ndarray
    held: np.ndarray

    @classmethod
    def load(cls, args: argparse.Namespace) -> Probe:
        poisoned, clean = read_images(args.poison), read_images(args.clean)
        originals = by_index(clean, poisoned.index)
        train, held = probe_split(len(poisoned), args.rows, args.held)
        return cls(preset(args.preset, args.set), poisoned, originals, train, held)


def as_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1], channels_last."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    return x.contiguous(memory_format=torch.channels_last)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Floats in [0, 1], (N, C, H, W) -> uint8 (N, H, W, C) by rounding, as the passes store."""
    x = torch.round(torch.clamp(x.float(), 0, 1) * 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def train_stage(
    cfg: PurifyConfig,
    stage: StageConfig,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    epochs: int | None = None,
    after_epoch: Callable[[int, DVAE], None] | None = None,
    input_noise: float = 0.0,
    input_attack: float = 0.0,
    read: np.ndarray | None = None,
) -> DVAE:
    """A fresh stage model trained on `images` for `epochs` (default: the stage's), cosine
    over all of them; `after_epoch(epoch, model)` is called after each (1-based). With
    `input_noise` the model reads each batch plus Gaussian noise of that std (fresh per
    step) and Eq. 14's targets stay the batch itself: a denoising stage. With
    `input_attack` it reads the batch moved, within an l_inf ball of that radius, to where
    the reconstruction errs most (`worst_input`), the targets again the batch itself. With
    `read` (the same rows, transformed) the model reads those and Eq. 14's targets stay
    `images`."""
    epochs = epochs or stage.epochs
    x = as_input(images).to(DEV)
    x_read = None if read is None else as_input(read).to(DEV)
    y = torch.from_numpy(labels.astype(np.int64)).to(DEV)
    amp = use_bf16(cfg.precision, DEV)  # as the pipeline's stage: `auto` decides
    torch.manual_seed(cfg.seed)
    model = build(cfg, num_classes, x.shape[-1])
    model = model.to(DEV, memory_format=torch.channels_last)  # type: ignore[call-overload]
    groups = model.param_groups(stage.lr, stage.phat_lr_scale, stage.embedding_lr_scale)
    opt = torch.optim.Adam(groups, lr=stage.lr, weight_decay=stage.weight_decay)
    batch = stage.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine(epochs * (len(x) // batch)))
    for epoch in range(epochs):
        perm = torch.randperm(len(x), device=DEV)
        for i in range(0, len(x) - batch + 1, batch):
            b = perm[i : i + batch]
            xb = x[b].contiguous(memory_format=torch.channels_last)
            x_in = xb if x_read is None else x_read[b].contiguous(memory_format=torch.channels_last)
            if input_noise:
                x_in = x_in + input_noise * torch.randn_like(x_in)
            if input_attack:
                x_in = worst_input(model, xb, y[b], input_attack, amp)
            with autocast(DEV, amp):
                x_hat, p_hat, mu, logvar = model(x_in, y[b])
            loss, _ = stage_loss(stage, epoch, xb, x_hat, p_hat, mu, logvar)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
            opt.step()
            sched.step()
        if after_epoch is not None:
            model.eval()
            after_epoch(epoch + 1, model)
            model.train()
    return model.eval()


def worst_input(
    model: DVAE, x: torch.Tensor, y: torch.Tensor, eps: float, amp: bool
) -> torch.Tensor:
    """One signed-gradient step from a random start in the l_inf ball of radius `eps` about
    `x` (fast adversarial training's FGSM, Wong et al. 2020), raising ||x_hat(x') - x||^2:
    the small input change that the reconstruction passes on most. Training on it asks the
    stage to map every image within `eps` back to the image itself."""
    delta = ((torch.rand_like(x) * 2 - 1) * eps).requires_grad_(True)
    with autocast(DEV, amp):
        x_hat = model(torch.clamp(x + delta, 0, 1), y)[0]
    (grad,) = torch.autograd.grad((x_hat.float() - x).pow(2).sum(), delta)
    delta = torch.clamp(delta.detach() + 1.25 * eps * grad.sign(), -eps, eps)
    return torch.clamp(x + delta, 0, 1).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def apply(
    model: DVAE, x: torch.Tensor, labels: np.ndarray, fn: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """`fn(model, x, y)` over `x` (float NCHW in [0, 1]) in batches of 256, as float NCHW
    on the CPU."""
    model.eval()
    out = []
    for i in range(0, len(x), 256):
        xb = x[i : i + 256].to(DEV).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(labels[i : i + 256].astype(np.int64)).to(DEV)
        out.append(fn(model, xb, y).float().cpu())
    return torch.cat(out)


def subtract(model: DVAE, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """clip(x - p_hat(x)), z = mu: P0 -> P1 and P1 -> P2."""
    return torch.clamp(x - perturbation(model, x, y), 0, 1)


def perturbation(model: DVAE, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p_hat(x), z = mu."""
    mu, _ = model.encode(x)
    return model.perturbation(mu, y).float()


def reconstruct(model: DVAE, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x_hat(x), z = mu."""
    mu, _ = model.encode(x)
    return model.reconstruct(mu).float()
