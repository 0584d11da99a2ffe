"""The one private Ray name raypurify relies on: Ray Train's report logger. If a Ray upgrade
moves or renames it, this fails here instead of every worker logging each report."""

from __future__ import annotations

import importlib
import subprocess
import sys

from raypurify.distributed import REPORT_LOGGER_MODULE, report_logger


def test_ray_train_logs_its_reports_to_the_logger_the_workers_quiet():
    module = importlib.import_module(REPORT_LOGGER_MODULE)
    assert module.logger is report_logger()


def test_a_bad_max_failures_is_refused_naming_the_variable(monkeypatch):
    import pytest

    from raypurify.distributed import max_failures
    from raypurify.errors import ConfigError

    monkeypatch.setenv("RAYPURIFY_MAX_FAILURES", "2")
    assert max_failures() == 2
    monkeypatch.setenv("RAYPURIFY_MAX_FAILURES", "two")
    with pytest.raises(ConfigError, match="RAYPURIFY_MAX_FAILURES"):
        max_failures()


def test_the_loops_ray_workers_import_do_not_pull_in_torchvision():
    """Every Ray Train worker and controller imports its loop's module; torchvision (and the
    torch._dynamo it drags in) would add seconds of start-up to each of them."""
    loops = ["raypurify.defenses.dvae.stage", "raypurify.training.worker"]
    code = f"import sys; [__import__(m) for m in {loops}]; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
