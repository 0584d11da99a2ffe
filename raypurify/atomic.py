"""Write-then-rename, so a crash never leaves a half-written dataset or checkpoint behind.

Outputs are staged in a hidden sibling directory (same filesystem, so the final rename is
atomic) and only renamed into place once complete and verified. An existing output is
replaced only when the caller asks for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raypurify.errors import RaypurifyError


def _sibling(path: Path, tag: str) -> Path:
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}"


def check_new(out: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked (call early, before any work)."""
    if Path(out).exists() and not overwrite:
        raise RaypurifyError(f"{out} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block completes."""
    out = Path(out)
    check_new(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing `dst` if present."""
    old = None
    if dst.exists():
        old = _sibling(dst, "old")
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save to a temp file, then rename (checkpoints are never half-written)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
