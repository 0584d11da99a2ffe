"""The UE-detection statistics and threshold (paper Table 8), on constructed scores."""

from __future__ import annotations

import numpy as np

from raypurify.experiments.analyses import detection_metrics, detection_scores, otsu_threshold


def test_otsu_splits_two_separated_groups():
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(1.0, 0.1, 300), rng.normal(3.0, 0.2, 700)])
    t = otsu_threshold(scores)
    assert 1.3 < t < 2.5


def test_class_wise_patterns_are_detected_without_labels():
    """p_hat of poisoned rows = their class's pattern + noise; of clean rows = noise only."""
    rng = np.random.default_rng(1)
    n, k = 400, 4
    labels = rng.integers(0, k, n)
    poisoned = rng.random(n) < 0.4
    patterns = rng.normal(0, 1, (k, 3, 8, 8))
    p_hat = rng.normal(0, 0.3, (n, 3, 8, 8))
    p_hat[poisoned] += patterns[labels[poisoned]]
    report = detection_metrics(detection_scores(p_hat, labels), poisoned)
    for stat in ("norm", "class_cosine"):
        assert report[stat]["accuracy"] > 0.95
        assert report[stat]["f1"] > 0.95
    # With nothing to find, precision cannot be high.
    clean = detection_metrics(detection_scores(rng.normal(0, 1, (n, 3, 8, 8)), labels), poisoned)
    assert clean["norm"]["precision"] < 0.7
