"""Write-then-rename, and never delete what the project did not write.

Outputs are staged in a hidden sibling directory (same filesystem, so the final rename is
atomic) and only renamed into place once complete and verified. Every output directory
this project writes is recognisable as its own: a dataset by its manifest's format, a
training run or a purification by a marker file (`.raypurify`). `--overwrite` replaces
only such a directory, never the input of the command nor a directory holding it, so a
mistyped `--out` cannot destroy a user's files. An experiment or a sweep is never
replaced, only added to: `check_home` lets it write only into a new or empty folder or
one that already holds its kind of output.
Staging directories are named for their writer's pid and host, so the next write of the
same target can remove what a killed writer left behind. `save_torch`'s counterpart for a
file the user gives, `load_user_torch`, reads it without unpickling anything.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from raypurify.errors import RaypurifyError

MARKER = ".raypurify"
_DATASET_FORMAT = "raypurify-interchange/"  # interchange.FORMAT's prefix (no import cycle)


def _sibling(path: Path, tag: str) -> Path:
    """A hidden sibling named for its writer: `.NAME.TAG-RANDOM-PID-HOST`."""
    owner = f"{os.getpid()}-{socket.gethostname()}"
    return path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}-{owner}"


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The marker of a directory this project wrote, or None (unmarked, unreadable)."""
    try:
        data = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_ours(path: str | Path) -> bool:
    """Whether `path` is a directory this project wrote (marker, or our dataset format)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    if read_marker(path) is not None:
        return True
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(
        _DATASET_FORMAT
    )


def replaceable(path: str | Path) -> bool:
    """Ours, or an empty folder (nothing in it to lose): what `--overwrite` may replace."""
    path = Path(path)
    if is_ours(path):
        return True
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def mark(directory: str | Path, **fields: Any) -> None:
    """Mark `directory` as written by this project (with what made it, if given)."""
    from raypurify import __version__

    data = {"writer": "raypurify", "version": __version__, **fields}
    write_json(Path(directory) / MARKER, data)


def check_not_input(out: str | Path, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse an output that is one of the inputs or a directory holding one."""
    target = Path(out).resolve()
    for given in inputs:
        if not given:
            continue
        src = Path(given).resolve()
        if src == target or target in src.parents:
            what = "is" if src == target else "contains"
            raise RaypurifyError(f"--out {out} {what} the input {given}; choose another --out")


def check_new(out: str | Path | None, overwrite: bool, inputs: Iterable = ()) -> None:
    """Refuse before any work to write `out` over anything but our own replaceable output.

    `out` may not exist yet; with `overwrite` it may be a directory this project wrote,
    but never an input nor a folder holding one.
    """
    if not out:
        raise RaypurifyError("--out is required (the output directory)")
    check_not_input(out, inputs)
    path = Path(out)
    if not (path.exists() or path.is_symlink()):
        above = next(p for p in path.absolute().parents if p.exists())
        if not above.is_dir():
            raise RaypurifyError(f"--out {out}: {above} is a file, not a folder")
        return
    if not replaceable(path):
        raise RaypurifyError(
            f"{out} already exists and was not written by raypurify (no {MARKER} marker); "
            "it is never replaced: choose another --out"
        )
    if not overwrite:
        raise RaypurifyError(f"{out} already exists; pass --overwrite to replace it")


def check_home(out: str | Path, signs: Sequence[str], kind: str) -> None:
    """Refuse, in one line, an existing `out` that is neither empty nor a `kind` output (one
    of `signs` inside it): such commands write their files into the folder one by one
    (results.md, the plots), and would replace a user's files of the same names."""
    path = Path(out)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and (any((path / s).exists() for s in signs) or not any(path.iterdir())):
        return
    held = " or ".join(signs)
    raise RaypurifyError(
        f"{out} already exists and holds no {kind} (no {held}); choose another --out"
    )


def remove_ours(path: str | Path) -> None:
    """Delete a directory this project wrote; refuse anything else."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not is_ours(path):
        raise RaypurifyError(f"{path} was not written by raypurify (no {MARKER}); not deleting it")
    shutil.rmtree(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: str | Path) -> list[Path]:
    """Remove staging leftovers of `out` whose writer (a process on this host) is gone.

    A killed writer leaves `.NAME.tmp-*` (a staged write) or `.NAME.old-*` (a replaced
    output not yet deleted), named for its pid and host. Another live writer's directory,
    one from another host (shared storage) or one we cannot attribute is left alone.
    """
    out = Path(out)
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    host = socket.gethostname()
    # A replaced output is only deleted once its successor is in place: a writer killed
    # between the two renames leaves the `.old-` directory as the only complete copy.
    for tag in ("tmp", "old") if out.exists() else ("tmp",):
        prefix = f".{out.name}.{tag}-"
        for p in out.parent.glob(f"{glob.escape(prefix)}*"):
            parts = p.name[len(prefix) :].split("-", 2)
            if len(parts) != 3 or not parts[1].isdigit() or parts[2] != host:
                continue
            if not p.is_dir() or p.is_symlink() or _alive(int(parts[1])):
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def staged_dir(
    out: str | Path, *, overwrite: bool = False, inputs: Iterable = ()
) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` when the block completes."""
    out = Path(out)
    inputs = list(inputs)
    check_new(out, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = _sibling(out, "tmp")
    try:
        tmp.mkdir()
    except OSError as e:  # a read-only or full place: name the user's path, not ours
        raise OSError(e.errno, e.strerror, str(out)) from None
    try:
        yield tmp
        check_new(out, overwrite, inputs)  # nothing unmarked appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    clean_stale(out)  # now that `out` is in place, a dead writer's `.old-` copy can go


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` to `dst`, replacing `dst` if present (only our own)."""
    old = None
    if dst.exists():
        if not replaceable(dst):
            raise RaypurifyError(f"{dst} was not written by raypurify; not replacing it")
        old = _sibling(dst, "old")
        os.rename(dst, old)
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename == str(tmp):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def write_json(path: str | Path, data: Any) -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode())


def save_torch(path: str | Path, obj: Any) -> None:
    """torch.save to a temp file, then rename (checkpoints are never half-written)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_user_torch(path: str | Path) -> Any:
    """torch.load of a file the user gave: weights_only (nothing is unpickled), on the CPU,
    and torch's warnings about the file (its pickle protocol, a sparse tensor's check) left
    out, as the caller turns a failure into one line (errors.unreadable_file)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like records ("a.b: 1 -> 2")."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old == new:
        return []
    short = [json.dumps(v, default=str) for v in (old, new)]
    short = [s if len(s) <= 24 else s[:21] + "..." for s in short]
    return [f"{prefix.rstrip('.')}: {short[0]} -> {short[1]}"]


def check_claim(
    out: str | Path, what: dict[str, Any], *, overwrite: bool = False, inputs: Iterable = ()
) -> str:
    """What `claim_dir` would do with `out`, without touching it: "new", "resume" or
    "replace"; raises the one-line refusal instead when `out` may not be used (so a
    command can refuse before it starts Ray)."""
    out = Path(out)
    check_not_input(out, inputs)
    if not (out.exists() or out.is_symlink()):
        return "new"
    plain_dir = out.is_dir() and not out.is_symlink()
    ours = read_marker(out) if plain_dir else None
    if overwrite and is_ours(out):  # a marked run, or a dataset
        return "replace"
    if ours is not None and ours.get("what") == what:
        return "resume"
    if ours is not None:
        diff = differences(ours.get("what"), what)
        shown = "; ".join(diff[:3]) + (f" (+{len(diff) - 3} more)" if len(diff) > 3 else "")
        raise RaypurifyError(
            f"{out} holds a run with another config or input ({shown}); "
            "choose another --out, or pass --overwrite to replace it"
        )
    if plain_dir and not any(out.iterdir()):  # an empty folder made for us is fine
        return "new"
    if is_ours(out):
        raise RaypurifyError(
            f"{out} holds a dataset; choose another --out, or pass --overwrite to replace it"
        )
    raise RaypurifyError(
        f"{out} already exists and was not written by this version of raypurify "
        f"(no {MARKER} marker); it is never replaced: choose another --out"
    )


def claim_dir(
    out: str | Path, what: dict[str, Any], *, overwrite: bool = False, inputs: Iterable = ()
) -> bool:
    """Make `out` the home of the run described by `what` (input ids and config).

    Returns True when `out` already holds that same run (resume or reuse it), False when it
    is new. A directory holding another run, or anything this project did not write, is
    refused with one line saying what differs; `overwrite` replaces only our own.
    """
    out = Path(out)
    action = check_claim(out, what, overwrite=overwrite, inputs=inputs)
    if action == "resume":
        return True
    if action == "replace":
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    mark(out, what=what)
    return False


def release(out: str | Path, existed: bool) -> None:
    """Undo a `claim_dir` that found nothing to resume, after a failure before any work:
    remove the directory if the claim made it, else only the marker it wrote."""
    out = Path(out)
    if not existed:
        remove_ours(out)
    elif not [p for p in out.iterdir() if p.name != MARKER]:
        (out / MARKER).unlink(missing_ok=True)
