"""The surrogate-based attacks, EM, TAP, REM and SEP, on 200 real CIFAR-10 images with tiny settings
(their surrogates train on a real local Ray Train): the l_inf budget holds exactly after
uint8 quantisation, labels and index are untouched, the ratio is honoured, class-wise EM
gives every image of a class the same perturbation, and the same seed gives the same poison."""

from __future__ import annotations

import numpy as np
import pytest

from raypurify.attacks.base import poison
from raypurify.data.registry import load
from raypurify.data.spec import DatasetSpec

RATIO = 0.5
EM_TINY = {
    "surrogate": "fast-resnet",
    "surrogate_options": {"width": 8},
    "max_rounds": 2,
    "train_steps": 2,
    "pgd_steps": 2,
    "batch_size": 64,
    "ratio": RATIO,
}
TAP_TINY = {
    "steps": 2,
    "restarts": 1,
    "surrogate_recipe": "cpu",
    "surrogate_overrides": ["epochs=1", "arch_options.width=8", "batch_size=32"],
    "ratio": RATIO,
}


@pytest.fixture(scope="module")
def clean(cifar10_dir):
    return load(DatasetSpec(name="cifar10", path=str(cifar10_dir), subset=200, seed=11))


def perturbation(clean, poisoned) -> np.ndarray:
    return poisoned.images.astype(np.int64) - clean.images.astype(np.int64)


def check_linf_poison(clean, poisoned, budget) -> np.ndarray:
    """The checks every l_inf 8/255 poison passes; returns the perturbation."""
    assert poisoned.images.dtype == np.uint8 and poisoned.images.shape == clean.images.shape
    assert np.array_equal(poisoned.labels, clean.labels)
    assert np.array_equal(poisoned.index, clean.index)
    assert poisoned.classes == clean.classes
    diff = perturbation(clean, poisoned)
    assert np.abs(diff).max() <= 8  # 8/255 exactly, on the uint8 grid
    assert np.abs(diff).max() >= 6  # and the budget is used
    assert budget["linf"] <= 8 / 255 and budget["linf_255"] == np.abs(diff).max()
    # A class-balanced half is poisoned, and nothing else changed.
    per_class = np.bincount(clean.labels[poisoned.poisoned], minlength=10)
    assert np.array_equal(per_class, np.floor(RATIO * clean.class_counts() + 0.5))
    changed = (diff != 0).any((1, 2, 3))
    assert not (changed & ~poisoned.poisoned).any()
    assert changed[poisoned.poisoned].mean() > 0.95
    assert budget["changed_rows"] == changed.sum()
    return diff


def test_sample_wise_em_keeps_the_budget_labels_and_ratio(ray_session, warm_fits, clean):
    poisoned, budget = poison(clean, "em", settings=EM_TINY)
    diff = check_linf_poison(clean, poisoned, budget)
    # One perturbation per image: two images of a class get different ones.
    rows = np.flatnonzero(poisoned.poisoned & (clean.labels == 3))
    assert not np.array_equal(diff[rows[0]], diff[rows[1]])


def class_pattern(diff: np.ndarray, poisoned_images: np.ndarray) -> np.ndarray:
    """The perturbation every image of one class shares, read where no image was clipped at
    0 or 255; asserts that all unclipped images agree and clipped ones only shrink it."""
    inside = (poisoned_images > 0) & (poisoned_images < 255)
    big = np.iinfo(np.int64).max
    high = np.where(inside, diff, -big).max(0)
    low = np.where(inside, diff, big).min(0)
    known = inside.any(0)
    assert known.mean() > 0.99
    assert np.array_equal(high[known], low[known])  # unclipped: one value per pixel
    pattern = np.where(known, high, 0)
    clipped = ~inside & known[None]
    shared = np.broadcast_to(pattern, diff.shape)
    assert (diff[clipped] * shared[clipped] >= 0).all()  # clipping shrinks towards 0 ...
    assert (np.abs(diff[clipped]) <= np.abs(shared[clipped])).all()  # ... never past it
    return pattern


def test_class_wise_em_gives_a_class_one_perturbation_and_is_seeded(ray_session, warm_fits, clean):
    settings = {**EM_TINY, "granularity": "class", "portion": 0.5}
    poisoned, budget = poison(clean, "em", settings=settings)
    diff = check_linf_poison(clean, poisoned, budget)
    patterns = []
    for c in range(10):
        rows = np.flatnonzero(poisoned.poisoned & (clean.labels == c))
        patterns.append(class_pattern(diff[rows], poisoned.images[rows]))
        assert np.abs(patterns[-1]).max() >= 6
    for a in range(10):
        for b in range(a + 1, 10):
            assert not np.array_equal(patterns[a], patterns[b])

    again, again_budget = poison(clean, "em", settings=settings)
    assert np.array_equal(again.images, poisoned.images)
    assert np.array_equal(again.poisoned, poisoned.poisoned)
    assert again_budget == budget


def test_tap_keeps_the_budget_labels_and_ratio_and_is_seeded(ray_session, warm_fits, clean):
    poisoned, budget = poison(clean, "tap", settings=TAP_TINY)
    diff = check_linf_poison(clean, poisoned, budget)
    rows = np.flatnonzero(poisoned.poisoned & (clean.labels == 5))
    assert not np.array_equal(diff[rows[0]], diff[rows[1]])  # per image, not per class

    again, _ = poison(clean, "tap", settings=TAP_TINY)
    assert np.array_equal(again.images, poisoned.images)
    assert np.array_equal(again.poisoned, poisoned.poisoned)


def test_untargeted_pgd_pushes_each_image_from_its_label_where_targeted_pulls_to_the_target(
    ray_session, clean
):
    import ray
    import torch
    import torch.nn.functional as F

    from raypurify.attacks.targeted import PGD, Crafter, Surrogates
    from raypurify.models import build_model

    torch.manual_seed(0)
    net = build_model("fast-resnet", 10, 32, width=8)
    x_all = torch.from_numpy(clean.images).permute(0, 3, 1, 2).float() / 255
    y_all = torch.from_numpy(clean.labels.astype(np.int64))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):  # a surrogate that has learned something, so its gradients mean it
        opt.zero_grad()
        F.cross_entropy(net(x_all), y_all).backward()
        opt.step()
    net.eval()
    rows = clean.take(np.arange(0, 200, 5))
    batch = {"image": rows.images, "label": rows.labels, "index": rows.index}
    x, y = x_all[::5], y_all[::5]

    def ce(delta: np.ndarray, target: torch.Tensor) -> float:
        adv = (x + torch.from_numpy(delta).permute(0, 3, 1, 2)).clamp(0, 1)
        with torch.no_grad():
            return F.cross_entropy(net(adv), target).item()

    def crafted(objective: str) -> np.ndarray:
        pgd = PGD(
            eps=8 / 255,
            steps=5,
            step_size=2 / 255,
            restarts=1,
            shift=1,
            augment=False,
            precision="fp32",
            seed=0,
            objective=objective,  # type: ignore[arg-type]
        )
        surrogates = Surrogates(ray.put([net.state_dict()]), "fast-resnet", {"width": 8}, 10, 32)
        delta = Crafter(surrogates, pgd)(batch)["delta"]
        assert np.abs(delta).max() <= 8 / 255 + 1e-6
        return delta

    none, target = np.zeros_like(crafted("targeted")), (y + 1) % 10
    away, towards = crafted("untargeted"), crafted("targeted")
    assert ce(away, y) > ce(none, y) + 0.1 and ce(away, y) > ce(towards, y)
    assert ce(towards, target) < ce(none, target) - 0.1 and ce(towards, target) < ce(away, target)


def test_tap_objective_leaves_the_targeted_configs_key_alone():
    from raypurify.attacks.tap import TAPConfig

    assert "objective" not in TAPConfig().to_dict()
    assert TAPConfig(objective="untargeted").to_dict()["objective"] == "untargeted"
    with pytest.raises(ValueError, match="objective"):
        TAPConfig(objective="sideways")  # type: ignore[arg-type]


REM_TINY = {
    "surrogate": "fast-resnet",
    "surrogate_options": {"width": 8},
    "max_rounds": 1,
    "train_steps": 2,
    "pgd_steps": 2,
    "eot": 2,
    "adv_steps": 2,
    "batch_size": 64,
    "ratio": RATIO,
}
SEP_TINY = {
    "steps": 2,
    "checkpoints": 2,
    "surrogate_recipe": "cpu",
    "surrogate_overrides": ["epochs=3", "arch_options.width=8", "batch_size=32"],
    "ratio": RATIO,
}


def test_rem_keeps_the_budget_labels_and_ratio(ray_session, warm_fits, clean):
    poisoned, budget = poison(clean, "rem", settings=REM_TINY)
    check_linf_poison(clean, poisoned, budget)


def test_sep_keeps_the_budget_labels_and_ratio(ray_session, warm_fits, clean):
    poisoned, budget = poison(clean, "sep", settings=SEP_TINY)
    check_linf_poison(clean, poisoned, budget)


def test_sep_ensembles_evenly_spaced_checkpoints():
    from raypurify.attacks.sep import spaced

    picks = spaced(list(range(1, 121)), 15)
    assert len(picks) == 15 and picks[0] == 1 and picks[-1] == 120
    gaps = np.diff(picks)
    assert gaps.min() >= 8 and gaps.max() <= 9  # as even as whole epochs allow
    assert spaced([1, 2, 3], 15) == [1, 2, 3]
