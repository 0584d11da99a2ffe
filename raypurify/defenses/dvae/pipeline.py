"""Algorithm 1 of the paper, as a pipeline of Ray Train stages and Ray Data passes.

    Stage 1: train a fresh D-VAE on P0 with kld1;   P1 = clip(x0 - p_hat(x0))
    Stage 2: train a fresh D-VAE on P1 with kld2;   P2 = clip(x1 - p_hat(x1))   (float)
                                                    P3 = x_hat(P2)
The plain VAE (Eq. 3) is one stage with P1 = x_hat(x0); the paper's ablations (config.py)
drop stage 1, stage 2's subtraction or stage 2.

Everything lands in the output directory: p1/, p2/, p3/ (interchange format, same `index`
and `label` as the input, lineage in their manifests), the stage weights, the Ray Train
checkpoints and summary.json. A rerun resumes: finished passes are reused, an interrupted
stage continues from its last epoch; but only when the output was made from the same input
content and config (recorded in its `.raypurify` marker), never a run of another input.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from raypurify.atomic import (
    check_claim,
    claim_dir,
    mark,
    read_marker,
    release,
    remove_ours,
    save_torch,
    write_json,
)
from raypurify.data.interchange import MANIFEST, DatasetInfo, open_dataset, read_images
from raypurify.distributed import use_gpu
from raypurify.errors import DatasetError
from raypurify.runtime import init_ray
from raypurify.tracking import Run, active_run, start_run
from raypurify.training.data import in_memory
from raypurify.worker_group import warm_workers
from raypurify.workers import check_one_batch

from .config import PurifyConfig
from .passes import run_pass
from .stage import images_per_s, train_stage

if TYPE_CHECKING:
    from collections.abc import Iterable

    from raypurify.data.imageset import ImageSet

SUMMARY = "summary.json"
CONFIG = "config.json"


def check_rows(info: DatasetInfo, cfg: PurifyConfig) -> None:
    """Refuse a dataset with no full batch of each stage for each worker."""
    for name, stage in cfg.stages:
        check_one_batch(
            info.rows, stage.batch_size, cfg.workers, str(info.path), f"{name}.batch_size"
        )


def check_output(out: Path, cfg: PurifyConfig, info: DatasetInfo, overwrite: bool) -> None:
    """Refuse, without touching `out`, what `purify` would refuse before any work (called
    before Ray starts): another run or anything not ours in `out`, a dataset too small
    for a batch."""
    what = {"input": info.sha256, "config": cfg.to_dict()}
    legacy = not overwrite and read_marker(out) is None and (out / CONFIG).is_file()
    if not (legacy and _legacy_matches(out, cfg, info)):
        check_claim(out, what, overwrite=overwrite, inputs=[info.path])
    check_rows(info, cfg)


def prepare_output(
    out: Path,
    cfg: PurifyConfig,
    info: DatasetInfo,
    overwrite: bool,
    inputs: Iterable[str | Path | None] = (),
) -> bool:
    """Claim `out` for purifying `info` with `cfg`; True when it already holds that run.

    `out` is reused or resumed only when it was made from the same input content and the
    same config (its marker records both); another run there is refused with what differs.
    An output from before the marker (config.json, and summary.json when finished) is
    adopted when it finished and its recorded config and input match; an unfinished one
    records no input, so it is refused rather than resumed on a guess.
    """
    what = {"input": info.sha256, "config": cfg.to_dict()}
    if not overwrite and read_marker(out) is None and (out / CONFIG).is_file():
        _adopt_legacy(out, cfg, info, what)
    resumed = claim_dir(out, what, overwrite=overwrite, inputs=inputs)
    write_json(out / CONFIG, cfg.to_dict())
    return resumed


def _adopt_legacy(out: Path, cfg: PurifyConfig, info: DatasetInfo, what: dict) -> None:
    if _legacy_matches(out, cfg, info):
        mark(out, what=what)


def _legacy_matches(out: Path, cfg: PurifyConfig, info: DatasetInfo) -> bool:
    try:
        stamp = json.loads((out / CONFIG).read_text())
        recorded = read_summary(out).get("input", {}).get("sha256")
    except (ValueError, AttributeError):
        return False  # not ours to judge: claim_dir refuses it
    return stamp == cfg.to_dict() and recorded == info.sha256


def check_input(info: DatasetInfo, data: ImageSet) -> None:
    present = np.unique(data.labels)
    if len(present) < 2:
        raise DatasetError(
            f"{info.path}: purification needs images of at least 2 classes, found only "
            f"class {present.tolist()}"
        )


def read_summary(out: Path) -> dict[str, Any]:
    """What a finished purification in `out` recorded ({} when none finished there)."""
    return json.loads((out / SUMMARY).read_text()) if (out / SUMMARY).exists() else {}


def recorded_input(out: Path) -> str | None:
    """The content sha256 of the dataset a purification in `out` was made from, as its
    marker (or, from before the marker, its summary) records it; None where neither does."""
    what = (read_marker(out) or {}).get("what")
    if isinstance(what, dict) and isinstance(what.get("input"), str):
        return what["input"]
    try:
        sha = read_summary(out).get("input", {}).get("sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return sha if isinstance(sha, str) else None


def recorded_outputs(summary: dict[str, Any]) -> dict[str, str]:
    """Each output's content sha256 as a finished purification's `summary` recorded it."""
    return {name: o["sha256"] for name, o in summary.get("outputs", {}).items()}


def _kept(path: Path, recorded: dict[str, str]) -> DatasetInfo | None:
    """The output at `path` if a rerun may keep it: it is there and, when a finished run
    recorded it, it is what that run wrote (not a dataset put in its place)."""
    found = open_dataset(path) if (path / MANIFEST).exists() else None
    if found is None or recorded.get(path.name, found.sha256) != found.sha256:
        return None
    return found


def finished(out: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    """`summary` of the purification finished in `out`, naming the outputs where `out`
    holds them now (a moved or copied directory keeps the paths it was written with); None
    when it did not finish or an output is gone or replaced, so the run resumes and makes
    it again from the stages' checkpoints."""
    recorded = recorded_outputs(summary)
    if not recorded:
        return None
    outputs = {}
    for name in recorded:
        if (found := _kept(out / name, recorded)) is None:
            return None
        outputs[name] = found.lineage()
    return summary | {"outputs": outputs, "output": str(out / Path(summary["output"]).name)}


def purify(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: PurifyConfig,
    *,
    overwrite: bool = False,
    run: Run | None = None,
) -> dict[str, Any]:
    """Purify the dataset at `data_dir` into `out_dir`; returns the summary."""
    info = open_dataset(data_dir)  # checked before any work
    out = Path(out_dir).resolve()
    existed = out.exists()
    resumed = prepare_output(out, cfg, info, overwrite, inputs=[info.path])
    previous = read_summary(out) if resumed else {}
    if (done := finished(out, previous)) is not None:
        return done
    recorded = recorded_outputs(previous)
    try:
        data0 = read_images(info.path)
        check_input(info, data0)
        check_rows(info, cfg)
    except BaseException:
        if not resumed:  # a bad input found while reading leaves nothing behind
            (out / CONFIG).unlink(missing_ok=True)
            release(out, existed)
        raise
    init_ray()
    gpu = use_gpu(cfg.device)
    start = time.perf_counter()
    parent = run or start_run("purify", out.name, params={"data": str(info.path), **cfg.to_dict()})
    summary: dict[str, Any] = {
        "input": info.lineage(),
        "config": cfg.to_dict(),
        "stages": {},
        "passes": {},
    }
    # Two stages, one after the other: the second runs on the first's warm workers instead
    # of starting its own (worker_group.py), unless the data is streamed through Ray Data
    # (too big for the object store), which a warm group does not host. Inside an
    # experiment, its group serves already.
    hosted = len(cfg.stages) > 1 and in_memory(data0.images.nbytes)
    warm = warm_workers(cfg.workers, cfg.device, out / "checkpoints" / ".warm-group", hosted)
    with active_run(parent) if run is None else contextlib.nullcontext(), warm:
        source, data = info, data0
        for name, stage in cfg.stages:
            t0 = time.perf_counter()
            child = parent.child(name, params={"stage": name, **stage.to_dict()})
            with active_run(child):
                # Only the last stage's passes hand back no data (see _run_passes).
                state, split = train_stage(
                    name, cast("ImageSet", data), cfg, stage, out / "checkpoints", run=child
                )
                weights = out / f"{name}.pt"
                save_torch(weights, state["model"])
                child.log_artifact(weights, "checkpoint")
            summary["stages"][name] = {
                "kld_limit": stage.kld_limit,
                "final": state["history"][-1],
                "history": state["history"],
                "train_s": time.perf_counter() - t0,
                **split,
                "images_per_s": images_per_s(state["history"]),
            }
            source, data = _run_passes(
                name, source, out, weights, cfg, gpu, summary, parent, recorded
            )
        summary["wall_s"] = time.perf_counter() - start
        summary |= work_split(summary)
        summary["output"] = str(source.path)
        summary["outputs"] = {
            p: open_dataset(out / p).lineage() for p in ("p1", "p2", "p3") if (out / p).exists()
        }
        parent.log_metrics({"wall_s": summary["wall_s"]})
        write_json(out / SUMMARY, summary)
        parent.log_artifact(out / SUMMARY)
    return summary


def work_split(summary: dict[str, Any]) -> dict[str, float]:
    """The purification's seconds in training epochs and inference batches (`work_s`) and
    in everything else (`overhead_s`: worker start-up, data hand-off, writes, teardown)."""
    parts = [*summary["stages"].values(), *summary["passes"].values()]
    work = float(sum(p.get("work_s", 0.0) for p in parts))
    return {"work_s": work, "overhead_s": summary["wall_s"] - work}


def _run_passes(
    name: str,
    source: DatasetInfo,
    out: Path,
    weights: Path,
    cfg: PurifyConfig,
    gpu: bool,
    summary: dict[str, Any],
    run: Run,
    recorded: dict[str, str],
) -> tuple[DatasetInfo, ImageSet | None]:
    """The inference pass(es) after stage `name`; returns (output info, its data or None)."""
    lineage = [source.lineage()]
    mode = cfg.pass_mode(name)
    last = name == cfg.stages[-1][0]
    image = cfg.output if last else "p1"  # only stage 1 passes its set on to another stage
    outputs = {"image": out / image}
    if mode == "subtract_reconstruct":
        outputs["p2"] = out / "p2"
    key = "p2_p3" if "p2" in outputs else image
    if all(_kept(p, recorded) for p in outputs.values()):
        timing = summary["passes"].get(key, {"seconds": 0.0, "reused": True})
    else:
        for p in outputs.values():  # a pass interrupted between its two writes
            remove_ours(p)
        timing = run_pass(
            source, outputs, weights=weights, cfg=cfg, mode=mode, gpu=gpu, lineage=lineage
        )
        run.log_metrics({f"pass_{key}_images_per_s": timing["images_per_s"]})
    summary["passes"][key] = timing
    result = open_dataset(outputs["image"])
    return result, (None if last else read_images(result.path))  # the next stage's input
