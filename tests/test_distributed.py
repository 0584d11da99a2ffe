"""The one private Ray name raypurify relies on: Ray Train's report logger. If a Ray upgrade
moves or renames it, this fails here instead of every worker logging each report."""

from __future__ import annotations

import importlib

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
