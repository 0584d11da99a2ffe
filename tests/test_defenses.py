"""The defences on real CIFAR-10 images: the squeezing transforms (JPEG, grayscale, BDR, ISS)
against their definitions, the training-time LossFns (cutout, mixup, cutmix, adversarial
training, UEraser) on a real small model, and `transform_dataset` through Ray Data."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from raypurify import defenses
from raypurify.data.interchange import open_dataset, read_images
from raypurify.data.interchange_ray import imageset_to_ray
from raypurify.data.registry import load
from raypurify.data.spec import DatasetSpec, Stream
from raypurify.defenses import adversarial, mixing, squeeze
from raypurify.defenses.apply import transform_dataset
from raypurify.errors import ConfigError
from raypurify.models import build_model
from raypurify.training.augment import to_input
from raypurify.training.config import TrainConfig
from raypurify.training.epoch import LossContext


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The in-process model work here is small: one thread, so it does not fight the
    machine's other work for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean(cifar10_dir):
    return load(DatasetSpec(name="cifar10", path=str(cifar10_dir), subset=200, seed=5))


def by_index(data):
    return data.take(np.argsort(data.index))


# ---------------------------------------------------------------------------------------
# Transforms of the training set


def pil_jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


def test_jpeg_honours_quality_and_matches_a_pil_round_trip(clean):
    images = clean.images
    change = []
    # (Not 75: the offline CIFAR-10 copy is itself JPEG-75, which re-encodes almost exactly.)
    for quality in (5, 10, 25, 50, 90):
        _, opts = defenses.options("jpeg", {"quality": quality})
        out = squeeze.jpeg(images, opts)
        assert out.dtype == np.uint8 and out.shape == images.shape
        for r in (0, 57, 199):
            assert np.array_equal(out[r], pil_jpeg(images[r], quality))
        change.append(np.abs(out.astype(np.int64) - images).mean())
    assert all(a > b for a, b in zip(change, change[1:], strict=False)), change
    assert change[-1] > 0  # even quality 90 is lossy
    with pytest.raises(ConfigError, match="quality"):
        defenses.options("jpeg", {"quality": 0})


def test_grayscale_is_rounded_itu_r_601_luma_on_every_channel(clean):
    out = squeeze.grayscale(clean.images)
    assert out.dtype == np.uint8 and out.shape == clean.images.shape
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    luma = clean.images.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    expected = np.floor(luma + 0.5)
    gap = np.abs(out[..., 0] - expected)
    # Exact, except that float32 arithmetic may round a value within 1e-4 of a half-way
    # point the other way.
    near_tie = np.abs(luma - np.floor(luma) - 0.5) < 1e-4
    assert (gap[~near_tie] == 0).all()
    assert (gap[near_tie] <= 1).all()
    assert not np.array_equal(out[..., 0], clean.images[..., 0])  # not just the red channel


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_bdr_leaves_two_to_the_bits_levels_per_channel(clean, bits):
    _, opts = defenses.options("bdr", {"bits": bits})
    out = squeeze.bit_depth(clean.images, opts)
    assert out.dtype == np.uint8 and out.shape == clean.images.shape
    levels = np.round(np.arange(2**bits) * 255 / (2**bits - 1))
    for c in range(3):
        assert np.array_equal(np.unique(out[..., c]), levels)
    # Every value goes to a nearest level.
    x = clean.images.astype(np.float64)[..., None]
    nearest = np.abs(x - levels).min(-1)
    assert np.array_equal(np.abs(out - clean.images.astype(np.float64)), nearest)


def test_iss_gray_is_grayscale_and_iss_jpeg_is_jpeg_at_its_quality(clean):
    images = clean.images[:64]
    _, gray = defenses.options("iss", {"mode": "gray"})
    assert np.array_equal(squeeze.iss(images, gray), squeeze.grayscale(images))
    _, jpeg = defenses.options("iss", {"mode": "jpeg", "quality": 30})
    expected = squeeze.jpeg(images, squeeze.JpegOptions(quality=30))
    assert np.array_equal(squeeze.iss(images, jpeg), expected)
    assert not np.array_equal(expected, squeeze.jpeg(images, squeeze.JpegOptions(quality=10)))
    _, default = defenses.options("iss")  # JPEG-10 unless told otherwise
    assert np.array_equal(
        squeeze.iss(images, default), squeeze.jpeg(images, squeeze.JpegOptions(quality=10))
    )


# ---------------------------------------------------------------------------------------
# Training-time defences: LossFns on a real small model


class Recorder(nn.Module):
    """A real model that also keeps what it was given and what it answered."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        out = self.inner(x)
        self.outputs.append(out.detach().clone())
        return out


@pytest.fixture(scope="module")
def batch(clean):
    """24 real images as the training loop hands them to a LossFn: float NCHW in [0, 1]."""
    x8 = torch.from_numpy(clean.images[::8].copy()).permute(0, 3, 1, 2)
    return to_input(x8), torch.from_numpy(clean.labels[::8].copy())


def fresh_model() -> Recorder:
    torch.manual_seed(0)
    return Recorder(build_model("fast-resnet", 10, 32, width=8)).train()


def run_loss(name, options, x, y, seed, epoch=0, epochs=2):
    defense, opts = defenses.options(name, options)
    assert defense.kind == "train"
    loss_fn = defense.loss(opts, TrainConfig())
    model = fresh_model()
    ctx = LossContext(
        epoch=epoch, epochs=epochs, gen=torch.Generator().manual_seed(seed), amp=False
    )
    loss, logits = loss_fn(model, x, y, ctx)
    return model, loss, logits


TRAIN_DEFENSES = {
    "cutout": {"size": 8},
    "mixup": {"alpha": 1.0},
    "cutmix": {"alpha": 1.0},
    "adversarial": {"steps": 3},
    "ueraser": {"repeats": 2, "repeat_epochs": 1},
}


@pytest.mark.parametrize("name", list(TRAIN_DEFENSES))
def test_loss_fn_gives_a_finite_scalar_and_logits_and_is_seeded(batch, name):
    x, y = batch
    model, loss, logits = run_loss(name, TRAIN_DEFENSES[name], x, y, seed=1)
    assert loss.shape == () and torch.isfinite(loss)
    assert logits.shape == (len(y), 10) and torch.isfinite(logits).all()
    assert model.training  # left in train mode for the optimiser step
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    again_model, again, again_logits = run_loss(name, TRAIN_DEFENSES[name], x, y, seed=1)
    assert torch.equal(loss, again) and torch.equal(logits, again_logits)
    assert torch.equal(model.inputs[-1], again_model.inputs[-1])
    other_model, _, _ = run_loss(name, TRAIN_DEFENSES[name], x, y, seed=2)
    assert not torch.equal(model.inputs[-1], other_model.inputs[-1])


def zero_box(zeros: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) if the True cells of `zeros` form one filled rectangle."""
    rows, cols = np.flatnonzero(zeros.any(1)), np.flatnonzero(zeros.any(0))
    if len(rows) == 0:
        return None
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    assert zeros[top:bottom, left:right].all() and zeros.sum() == (bottom - top) * (right - left)
    return top, bottom, left, right


@pytest.mark.parametrize("size", [5, 8, 16])
def test_cutout_zeroes_a_square_of_the_given_size(batch, size):
    x, y = batch
    x = x.clamp_min(0.01)  # so that only the cutout makes a zero pixel
    model, _, _ = run_loss("cutout", {"size": size}, x, y, seed=3)
    (seen,) = model.inputs
    zeros = (seen == 0).all(1).numpy()
    assert ((seen == 0).any(1) == (seen == 0).all(1)).all()  # all channels or none
    kept = ~torch.from_numpy(zeros)[:, None].expand_as(seen)
    assert torch.equal(seen[kept], x[kept])  # and nothing else changes
    full = 0
    for img in zeros:
        top, bottom, left, right = zero_box(img)
        h, w = bottom - top, right - left
        assert h <= size and w <= size
        # Smaller only where the square is cut off by the image border.
        assert h == size or top == 0 or bottom == 32
        assert w == size or left == 0 or right == 32
        full += h == size and w == size
    assert full > 0

    # Many draws of the mask: every square inside the image is exactly size x size.
    masks = mixing.cutout_mask(2000, 32, 32, size, torch.Generator().manual_seed(0))
    sides = set()
    for m in masks[:, 0].numpy() == 0:
        top, bottom, left, right = zero_box(m)
        if top > 0 and bottom < 32 and left > 0 and right < 32:
            sides.add((bottom - top, right - left))
    assert sides == {(size, size)}


def fitted_model(x, y, steps=20) -> nn.Module:
    """The small model fitted to the batch, so that its loss there is low (an untrained one
    answers every input with near-uniform logits, and no attack moves its loss)."""
    model = fresh_model().inner
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m in model.modules():  # BatchNorm statistics of this batch, for eval mode
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model(x)
    return model.eval()


def test_adversarial_examples_stay_in_the_ball_and_raise_the_loss(batch):
    x, y = batch
    _, opts = defenses.options("adversarial", {"steps": 5})
    model = fitted_model(x, y)
    x_adv = adversarial.pgd(model, x, y, opts, torch.Generator().manual_seed(0), amp=False)
    gap = (x_adv - x).abs()
    assert gap.max() <= opts.eps + 1e-6 and gap.max() > opts.eps / 2
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        before = F.cross_entropy(model(x), y)
        after = F.cross_entropy(model(x_adv), y)
        noise = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1) * opts.eps
        noisy = F.cross_entropy(model((x + noise).clamp(0, 1)), y)
    assert after > 2 * before and after > 2 * noisy  # far more than random noise does

    # Through the LossFn: the model trains on such examples, in train mode.
    model, loss, logits = run_loss("adversarial", {"steps": 5}, x, y, seed=0)
    trained_on = model.inputs[-1]
    assert len(model.inputs) == 6  # 5 attack steps, then the training forward
    assert (trained_on - x).abs().max() <= opts.eps + 1e-6
    assert not torch.equal(trained_on, x)
    assert torch.allclose(loss, F.cross_entropy(logits, y))


def ce(logits, y):
    return F.cross_entropy(logits, y)


def test_mixup_mixes_images_and_labels_with_one_weight(batch):
    x, y = batch
    model, loss, logits = run_loss("mixup", {"alpha": 1.0}, x, y, seed=4)
    (seen,) = model.inputs
    flat_x, flat_seen = x.flatten(1).double(), seen.flatten(1).double()
    # seen_i = lam x_i + (1 - lam) x_j: find j and lam for each row by least squares.
    partner, weights = [], []
    for i in range(len(x)):
        best = None
        for j in range(len(x)):
            d = flat_x[i] - flat_x[j]
            lam = 1.0 if j == i else float((flat_seen[i] - flat_x[j]) @ d / (d @ d))
            residual = float((flat_seen[i] - flat_x[j] - lam * d).abs().max())
            if best is None or residual < best[0]:
                best = (residual, j, lam)
        assert best[0] < 1e-5
        partner.append(best[1])
        if best[1] != i:
            weights.append(best[2])
    assert len(weights) > len(x) // 2
    lam = weights[0]
    assert 0 < lam < 1 and np.allclose(weights, lam, atol=1e-5)
    perm = torch.tensor(partner)
    mixed = lam * ce(logits, y) + (1 - lam) * ce(logits, y[perm])
    assert torch.allclose(loss, mixed.float(), atol=1e-5)
    assert not torch.allclose(loss, ce(logits, y), atol=1e-3)


def test_cutmix_pastes_one_box_and_weights_labels_by_its_area(batch):
    x, y = batch
    model, loss, logits = run_loss("cutmix", {"alpha": 1.0}, x, y, seed=6)
    (seen,) = model.inputs
    changed = (seen != x).any(1).any(0).numpy()
    top, bottom, left, right = zero_box(changed)
    box = (slice(None), slice(top, bottom), slice(left, right))
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[box[1:]] = False
    assert torch.equal(seen[:, :, outside], x[:, :, outside])
    perm = []
    for i in range(len(x)):
        (match,) = [j for j in range(len(x)) if torch.equal(seen[i][box], x[j][box])]
        perm.append(match)
    perm = torch.tensor(perm)
    assert sorted(perm.tolist()) == list(range(len(x))) and (perm != torch.arange(len(x))).any()
    lam = 1 - (bottom - top) * (right - left) / (32 * 32)
    assert 0 < lam < 1
    mixed = lam * ce(logits, y) + (1 - lam) * ce(logits, y[perm])
    assert torch.allclose(loss, mixed, atol=1e-5)
    assert not torch.allclose(loss, ce(logits, y), atol=1e-3)


def test_ueraser_augments_and_takes_the_worst_of_repeats_while_repeating(batch):
    x, y = batch
    n, options = len(y), {"repeats": 3, "repeat_epochs": 1}
    model, loss, logits = run_loss("ueraser", options, x, y, seed=7, epoch=0)
    (seen,) = model.inputs
    (out,) = model.outputs
    assert seen.shape == (3 * n, *x.shape[1:])
    assert seen.min() >= 0 and seen.max() <= 1
    copies = seen.view(3, n, *x.shape[1:])
    for k in range(3):
        assert (copies[k] - x).abs().mean() > 0.02  # the images really change
    assert not torch.equal(copies[0], copies[1]) and not torch.equal(copies[1], copies[2])
    per_image = F.cross_entropy(out, y.repeat(3), reduction="none").view(3, n)
    assert torch.allclose(loss, per_image.max(0).values.mean(), atol=1e-5)
    assert loss > per_image.mean() + 1e-4  # the maximum, not the mean
    assert torch.equal(logits.detach(), out[:n])

    model, loss, logits = run_loss("ueraser", options, x, y, seed=7, epoch=1)
    (seen,) = model.inputs
    assert seen.shape == x.shape  # one copy from `repeat_epochs` on
    assert (seen - x).abs().mean() > 0.02
    assert torch.allclose(loss, ce(logits, y), atol=1e-5)


# ---------------------------------------------------------------------------------------
# Applying a transform defence to a whole dataset through Ray Data


def test_transform_dataset_writes_the_in_process_transform(ray_session, clean, tmp_path):
    defense, opts = defenses.options("jpeg", {"quality": 30})
    source = Stream(imageset_to_ray(clean), clean.classes, clean.shape, len(clean), "cifar")
    parents = [{"source": "cifar10", "split": "train"}]
    info = transform_dataset(defense, opts, source, tmp_path / "jpeg", parents=parents)
    assert info.rows == len(clean) and info.classes == clean.classes
    assert info.manifest["config"] == {"defense": "jpeg", "options": {"quality": 30}}
    assert info.manifest["parents"] == parents
    written = by_index(read_images(info.path))
    expected = by_index(clean)
    assert np.array_equal(written.index, expected.index)
    assert np.array_equal(written.labels, expected.labels)
    assert np.array_equal(written.images, squeeze.jpeg(expected.images, opts))
    assert open_dataset(tmp_path / "jpeg").sha256 == info.sha256

    cutout, cutout_opts = defenses.options("cutout")
    with pytest.raises(ValueError, match="not a dataset transform"):
        transform_dataset(cutout, cutout_opts, source, tmp_path / "cutout")
    assert not (tmp_path / "cutout").exists()
