"""The demo tells the method's story at its own settings: the poison collapses accuracy and
D-VAE brings it back, at least as far as JPEG (issue 16's bar). A change to the demo, an
attack, D-VAE or the classifier that breaks the story fails here."""

from __future__ import annotations

import pytest
from conftest import new_store

from raypurify.experiments import load_spec
from raypurify.experiments.runner import run_experiment

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ATTACK = "em-class"
POINTS = 0.15  # the story's margins: collapse and recovery of at least 15 points


@pytest.fixture(scope="module")
def accuracy(ray_session, mlflow_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-story")
    env = pytest.MonkeyPatch()
    env.setenv("MLFLOW_TRACKING_URI", new_store(mlflow_template, root))
    try:
        results = run_experiment(load_spec("demo"), root / "out")
    finally:
        env.undo()
    return {(c["row"], c["column"]): c["accuracy"] for c in results["cells"]}


def test_the_poison_collapses_accuracy(accuracy):
    assert accuracy[(ATTACK, "none")] <= accuracy[("clean", "none")] - POINTS


def test_dvae_brings_it_back_at_least_as_far_as_jpeg(accuracy):
    assert accuracy[(ATTACK, "dvae")] >= accuracy[(ATTACK, "none")] + POINTS
    assert accuracy[(ATTACK, "dvae")] >= accuracy[(ATTACK, "jpeg")] - 0.01
