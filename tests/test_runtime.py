"""Precision chosen at run time: bf16 on a CPU only where it has AMX (elsewhere oneDNN's bf16
is slower than fp32, or emulated), and RAYPURIFY_PRECISION decides "auto" when set."""

from __future__ import annotations

import pytest
import torch

from raypurify.errors import ConfigError
from raypurify.runtime import use_bf16

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [({"amx_bf16": True, "avx512_bf16": True}, True), ({"avx512_bf16": True}, False), ({}, False)],
)
def test_auto_picks_bf16_on_a_cpu_only_with_amx(monkeypatch, capabilities, expected):
    monkeypatch.delenv("RAYPURIFY_PRECISION", raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    assert use_bf16("auto", CPU) is expected
    assert use_bf16("bf16", CPU) is True and use_bf16("fp32", CPU) is False


def test_the_environment_decides_auto_and_a_bad_value_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True}, raising=False)
    monkeypatch.setenv("RAYPURIFY_PRECISION", "fp32")
    assert use_bf16("auto", CPU) is False
    assert use_bf16("bf16", CPU) is True  # an explicit config wins
    monkeypatch.setenv("RAYPURIFY_PRECISION", "half")
    with pytest.raises(ConfigError, match="RAYPURIFY_PRECISION"):
        use_bf16("auto", CPU)
