"""The one-line warning before a training step (an EM surrogate, a classifier, a D-VAE
stage) that would take hours on this CPU."""

from __future__ import annotations

from raypurify import estimate
from raypurify.attacks.em import CPU_HINT, EMConfig, MinMin
from raypurify.models import build_model


def test_em_worst_case_counts_surrogate_steps_and_noise_passes():
    sample = EMConfig(granularity="sample", max_rounds=10, train_steps=5, batch_size=100)
    assert MinMin.worst_case_passes(sample, 1000) == 10 * (5 * 100 + 20 * 1000)
    cls = EMConfig(granularity="class", max_rounds=10, train_steps=5, batch_size=100, portion=0.2)
    assert MinMin.worst_case_passes(cls, 1000) == 10 * (5 * 100 + 200)


def test_a_step_beyond_an_hour_says_so_once_with_the_smaller_setting(capsys):
    passes = MinMin.worst_case_passes(EMConfig(), 10_000)  # the authors' settings
    seconds = estimate.warn_if_long("EM (rounds)", passes, lambda: 70.0, CPU_HINT)  # ResNet-18
    assert seconds == passes / 70.0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("EM (rounds): up to 20,512,000 image passes at 70 img/s")
    assert "surrogate=fast-resnet" in line

    estimate.warn_if_long("EM (rounds)", passes, lambda: 1e6, CPU_HINT)
    assert capsys.readouterr().err == ""  # a short step says nothing


def test_a_step_too_small_to_take_an_hour_is_not_timed(capsys):
    def measure():
        raise AssertionError("timed a step of a few image passes")

    assert estimate.warn_if_long("tiny", estimate.MIN_PASSES - 1, measure, "hint") is None
    assert capsys.readouterr().err == ""


def small_set(rows):
    from raypurify.data.registry import load
    from raypurify.data.spec import DatasetSpec

    return load(DatasetSpec(name="synthetic", rows=rows, size=32, classes=10))


def test_the_paper_recipe_on_a_cpu_names_the_cpu_recipe(monkeypatch, capsys):
    from raypurify.training import classifier
    from raypurify.training.config import recipe

    timed = []
    monkeypatch.setattr(estimate, "_rates", {})  # nothing measured before this test
    monkeypatch.setattr(classifier, "train_rate", lambda *a: timed.append(a) or 74.0)
    classifier.warn_if_slow_on_cpu(small_set(5_000), recipe("paper"))  # ResNet-18, 2 cores
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("train resnet18: up to 300,000 image passes at 74 img/s")
    assert "--recipe cpu" in line
    classifier.warn_if_slow_on_cpu(small_set(5_000), recipe("paper", ["epochs=90"]))
    assert "450,000 image passes" in capsys.readouterr().err
    assert len(timed) == 1  # the same network is timed once per process
    classifier.warn_if_slow_on_cpu(small_set(5_000), recipe("cpu"))  # 70,000 passes
    assert capsys.readouterr().err == ""  # the measured rate of the small net: well under


def test_the_paper_purifier_on_a_cpu_names_the_cpu_preset(monkeypatch, capsys):
    from raypurify.defenses.dvae import stage
    from raypurify.defenses.dvae.config import preset

    cfg = preset("paper")
    monkeypatch.setattr(estimate, "_rates", {})
    monkeypatch.setattr(stage, "rate_of", lambda *a: 63.0)  # the paper net, 2 cores
    stage.warn_if_slow_on_cpu(small_set(5_000), cfg, cfg.stage1, "stage1")
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("D-VAE stage1: up to 300,000 image passes at 63 img/s")
    assert "--preset cpu" in line


def test_the_purifier_rate_is_measured_on_the_real_network(monkeypatch, capsys):
    from raypurify.defenses.dvae import stage
    from raypurify.defenses.dvae.config import preset

    monkeypatch.setattr(estimate, "LONG_S", 0.0)  # say every estimate
    monkeypatch.setattr(estimate, "_rates", {})
    cfg = preset("cpu", ["model.width=8", "model.latent=16"])
    stage.warn_if_slow_on_cpu(small_set(5_000), cfg, cfg.stage1, "stage1")
    (line,) = capsys.readouterr().err.strip().splitlines()
    rate = float(line.split(" at ")[1].split(" img/s")[0].replace(",", ""))
    assert rate > 0


def test_the_rate_is_measured_on_the_real_network():
    rate = estimate.train_rate(build_model("fast-resnet", 10, 32, width=8), 10, (3, 32, 32), 16)
    assert 0 < rate < float("inf")
