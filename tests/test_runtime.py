"""Precision chosen at run time: bf16 on a CPU only where it measured faster than fp32 (AMX,
or AVX-512-BF16 on AMD; on Intel without AMX oneDNN's bf16 is slower, on AVX2 emulated),
and RAYPURIFY_PRECISION decides "auto" when set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raypurify import runtime
from raypurify.errors import ConfigError
from raypurify.runtime import use_bf16

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("capabilities", "vendor", "expected"),
    [
        ({"amx_bf16": True, "avx512_bf16": True}, "GenuineIntel", True),
        ({"avx512_bf16": True}, "GenuineIntel", False),
        ({"avx512_bf16": True}, "AuthenticAMD", True),
        ({"avx2": True}, "AuthenticAMD", False),
        ({}, "", False),
    ],
)
def test_auto_picks_bf16_on_a_cpu_only_where_it_measured_faster(
    monkeypatch, capabilities, vendor, expected
):
    monkeypatch.delenv("RAYPURIFY_PRECISION", raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    monkeypatch.setattr(runtime, "cpu_vendor", lambda: vendor)
    assert use_bf16("auto", CPU) is expected
    assert use_bf16("bf16", CPU) is True and use_bf16("fp32", CPU) is False


def test_the_cpu_vendor_is_read_from_this_machine():
    cpuinfo = Path("/proc/cpuinfo")
    names = cpuinfo.read_text() if cpuinfo.exists() else ""
    vendor = runtime.cpu_vendor()
    assert (vendor in names) if vendor else ("vendor_id" not in names)


def test_the_environment_decides_auto_and_a_bad_value_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": True}, raising=False)
    monkeypatch.setenv("RAYPURIFY_PRECISION", "fp32")
    assert use_bf16("auto", CPU) is False
    assert use_bf16("bf16", CPU) is True  # an explicit config wins
    monkeypatch.setenv("RAYPURIFY_PRECISION", "BF16")  # any case
    assert use_bf16("auto", CPU) is True
    monkeypatch.setenv("RAYPURIFY_PRECISION", "")  # set but empty: as unset, the CPU decides
    assert use_bf16("auto", CPU) is True
    monkeypatch.setenv("RAYPURIFY_PRECISION", "half")
    with pytest.raises(ConfigError, match="RAYPURIFY_PRECISION"):
        use_bf16("auto", CPU)


def test_the_environment_sets_every_configs_auto_before_any_work(monkeypatch, tmp_path, capsys):
    """RAYPURIFY_PRECISION acts as `--set precision=...` on each config left at auto, so
    it is part of what a result is reused for; a bad value stops a command before it
    writes anything."""
    from raypurify.cli import main
    from raypurify.data.registry import load
    from raypurify.data.spec import DatasetSpec
    from raypurify.defenses.dvae.config import PurifyConfig, preset
    from raypurify.training.config import recipe

    monkeypatch.delenv("RAYPURIFY_PRECISION")
    assert PurifyConfig().precision == "auto" and recipe("cpu").precision == "auto"
    monkeypatch.setenv("RAYPURIFY_PRECISION", "bf16")
    assert PurifyConfig().precision == "bf16" and preset("cpu").precision == "bf16"
    assert (
        recipe("cpu").precision == "bf16" and recipe("cpu", ["precision=fp32"]).precision == "fp32"
    )

    from raypurify.data.interchange import write_images

    write_images(load(DatasetSpec(name="synthetic", rows=60, size=8, classes=3)), tmp_path / "d")
    monkeypatch.setenv("RAYPURIFY_PRECISION", "half")
    argv = ["purify", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "p")]
    assert main(argv) == 2
    assert "RAYPURIFY_PRECISION: 'half'" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
