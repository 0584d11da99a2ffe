"""Shared by the bench/ scripts: machine facts and JSON + markdown result files.

Every benchmark writes bench/results/<name>.json (rows plus the machine and command that
produced them) and bench/results/<name>.md (the same rows as a table), and prints the table.
On a machine with a GPU the benchmarks time the GPU and write <name>-gpu.{json,md}; on a
CPU with AMX, <name>-amx; on one with AVX2 but no AVX-512, <name>-avx2; on an AMD CPU with
AVX-512, <name>-amd-avx512; on an Intel one with AVX-512 but no AMX, plain <name> (the
kinds differ up to 3x, and the model name alone does not tell them apart): figures of each
kind sit side by side, and a run on one kind never overwrites another's.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def machine() -> dict[str, Any]:
    import ray
    import torch

    cpu = platform.processor() or "unknown"
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        cpu = fields.get("model name", cpu)
        # Virtual machines often name only the vendor line ("AMD EPYC"); family and model
        # tell its generations apart (family 23 model 49 is Zen 2, family 25 model 17 Zen 4).
        if "cpu family" in fields and "model" in fields:
            cpu += f", family {fields['cpu family']} model {fields['model']}"
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_kind": cpu_kind(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # What the project's `precision: auto` is forced to, if anything (fp32, bf16).
        "precision": os.environ.get("RAYPURIFY_PRECISION"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def cpu_kind() -> str:
    """What decides this CPU's speed and precision: `amx`, `avx512-bf16`, `avx512`, `avx2`
    (or `other`), from what torch's kernels detect."""
    import torch

    caps: dict[str, bool] = getattr(torch.cpu, "get_capabilities", dict)()
    for flag, kind in (
        ("amx_bf16", "amx"),
        ("avx512_bf16", "avx512-bf16"),
        ("avx512f", "avx512"),
        ("avx2", "avx2"),
    ):
        if caps.get(flag):
            return kind
    return "other"


def synchronized(dev) -> float:
    """perf_counter() once the device's queued work is done (CUDA kernels run async)."""
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)
    return time.perf_counter()


def worker_counts() -> tuple[int, ...]:
    """Ray Train worker counts to time: 1 and 2, unless a lone GPU can host only one."""
    import torch

    return (1,) if torch.cuda.device_count() == 1 else (1, 2)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_results(
    name: str, rows: list[dict[str, Any]], columns: list[str], notes: str = ""
) -> Path:
    """Print and save the results of benchmark `name`; returns the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    if info["gpu"]:
        name = f"{name}-gpu"
    elif info["cpu_kind"] in ("amx", "avx2"):
        name = f"{name}-{info['cpu_kind']}"
    elif info["cpu_kind"].startswith("avx512") and info["cpu"].startswith("AMD"):
        name = f"{name}-amd-avx512"
    if info["precision"]:  # a forced precision is kept apart from the machine's `auto`
        name = f"{name}-{info['precision']}"
    md = [f"# {name}", "", table(rows, columns), ""]
    if notes:
        md += [notes, ""]
    md.append(
        f"Machine: {info['cpu']} ({info['cpu_kind']}), {info['cores']} cores, "
        f"GPU {info['gpu'] or 'none'}; precision {info['precision'] or 'auto'}; "
        f"torch {info['torch']}, ray {info['ray']}; {info['date']}."
    )
    md.append(f"Command: `{info['command']}`")
    text = "\n".join(md) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps({"name": name, "machine": info, "rows": rows, "notes": notes}, indent=2) + "\n"
    )
    print(text)
    return path
