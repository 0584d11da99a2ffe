"""The one-line warning before a surrogate step that would take hours on this CPU."""

from __future__ import annotations

import functools

from raypurify import estimate
from raypurify.attacks.em import CPU_HINT, EMConfig, MinMin
from raypurify.models import build_model


def test_em_worst_case_counts_surrogate_steps_and_noise_passes():
    sample = EMConfig(granularity="sample", max_rounds=10, train_steps=5, batch_size=100)
    assert MinMin.worst_case_passes(sample, 1000) == 10 * (5 * 100 + 20 * 1000)
    cls = EMConfig(granularity="class", max_rounds=10, train_steps=5, batch_size=100, portion=0.2)
    assert MinMin.worst_case_passes(cls, 1000) == 10 * (5 * 100 + 200)


def test_a_step_beyond_an_hour_says_so_once_with_the_smaller_setting(monkeypatch, capsys):
    monkeypatch.setattr(estimate, "train_rate", lambda *a, **k: 70.0)  # ResNet-18 on 2 cores
    build = functools.partial(build_model, "resnet18", 10, 32)
    passes = MinMin.worst_case_passes(EMConfig(), 10_000)  # the authors' settings
    seconds = estimate.warn_if_long("EM (rounds)", passes, build, 10, (3, 32, 32), CPU_HINT)
    assert seconds == passes / 70.0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("EM (rounds): up to 20,512,000 image passes at 70 img/s")
    assert "surrogate=fast-resnet" in line

    monkeypatch.setattr(estimate, "train_rate", lambda *a, **k: 1e6)
    estimate.warn_if_long("EM (rounds)", passes, build, 10, (3, 32, 32), CPU_HINT)
    assert capsys.readouterr().err == ""  # a short step says nothing


def test_the_rate_is_measured_on_the_real_network():
    rate = estimate.train_rate(build_model("fast-resnet", 10, 32, width=8), 10, (3, 32, 32), 16)
    assert 0 < rate < float("inf")
