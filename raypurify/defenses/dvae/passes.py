"""Purification inference as Ray Data `map_batches`.

Each worker process loads one trained stage model once and purifies batches of decoded rows:
- "subtract":  x -> clip(x - p_hat(x))                      (P0 -> P1, P1 -> P2)
- "subtract_reconstruct": x -> x2 = clip(x - p_hat(x)), x3 = x_hat(x2); x2 stays float
  between the two steps and is also returned (as `p2`) so P2 and P3 come from one pass
- "reconstruct": x -> x_hat(x)                              (the plain VAE)
- "perturbation": x -> p_hat(x) as floats                    (detection, Table 1 check)
With `sample`, z is drawn from q(z|x) with noise seeded by (seed, row index), so results
do not depend on how Ray Data batches the rows; otherwise z = mu. On CPU each row has its
own generator; on a GPU one generator per block of NOISE_BLOCK consecutive indices draws
on the device (a generator per row is a Python loop on the CPU: about 1,800 rows/s for the
paper net's latent, one process, which would cap a GPU's sampled pass at 900-1,800 images/s),
so the noise differs between CPU and GPU, not between batchings.

On CPU a pass runs as Ray Data tasks: they run in Ray's pooled worker processes, which stay
alive between passes with torch imported, so only a run's first pass pays for a process
start (an actor pool starts a fresh process, and imports torch, for every pass; seconds
each on 2 cores, as long as a demo-scale pass's work, bench/demo.py). Each process keeps
the last model it loaded. On a GPU Ray gives a task a fresh process per call (its
`max_calls` is 1 for GPU tasks), so there a pass keeps actors instead: `infer_actors` of
them share the cluster's GPUs (two on one GPU overlap one's Ray Data hand-off with the
other's compute).
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray.data
import torch

from raypurify.data.interchange import DatasetInfo
from raypurify.data.interchange_ray import read_ray, write_ray_images
from raypurify.progress import BarQueue, Progress, add
from raypurify.runtime import autocast, torch_threads, use_bf16

from .config import PurifyConfig
from .stage import build

Mode = Literal["subtract", "subtract_reconstruct", "reconstruct", "perturbation"]


@dataclass(frozen=True)
class PassSpec:
    """What every actor of a pass needs: the stage model (its weights and the config that
    builds it), the data's shape, and what to compute."""

    weights: str
    purify: PurifyConfig
    num_classes: int
    image_size: int
    mode: Mode


class PurifyPass:
    """Ray Data callable class: one stage model, applied batch by batch."""

    def __init__(self, spec: PassSpec, progress: BarQueue | None = None):
        cfg = spec.purify
        self.dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.dev.type == "cpu":
            torch.set_num_threads(torch_threads(cfg.threads, cfg.infer_actors))
        self.model = build(cfg, spec.num_classes, spec.image_size)
        self.model.load_state_dict(torch.load(spec.weights, map_location="cpu", weights_only=True))
        # torch's overloads of Module.to lack (device, memory_format=), which it accepts.
        self.model = self.model.to(self.dev, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
        self.amp, self.sample, self.seed, self.mode = (
            use_bf16(cfg.precision, self.dev),
            cfg.sample,
            cfg.seed,
            spec.mode,
        )
        self.progress = progress  # a Ray queue feeding the driver's bar

    def _z(self, x: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        mu, logvar = self.model.encode(x)
        mu, logvar = mu.float(), logvar.float()
        if not self.sample:
            return mu
        draw = row_normal if self.dev.type == "cpu" else block_normal
        eps = draw(self.seed, index, tuple(mu.shape[1:]), self.dev)
        return mu + eps * torch.exp(0.5 * logvar)

    def _subtract(self, x: torch.Tensor, y: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        return torch.clamp(x - self.model.perturbation(self._z(x, index), y).float(), 0, 1)

    def _reconstruct(self, x: torch.Tensor, index: np.ndarray) -> torch.Tensor:
        return self.model.reconstruct(self._z(x, index)).float()

    @torch.no_grad()
    def compute(
        self, x: torch.Tensor, y: torch.Tensor, index: np.ndarray
    ) -> dict[str, torch.Tensor]:
        """The pass on device tensors (x in [0, 1], NCHW): its outputs as float tensors."""
        with autocast(self.dev, self.amp):
            if self.mode == "perturbation":  # p_hat itself, for the analyses
                return {"p_hat": self.model.perturbation(self._z(x, index), y).float()}
            if self.mode == "subtract":
                return {"image": self._subtract(x, y, index)}
            if self.mode == "reconstruct":
                return {"image": self._reconstruct(x, index)}
            x2 = self._subtract(x, y, index)
            x3 = self._reconstruct(x2.contiguous(memory_format=torch.channels_last), index)
            return {"image": x3, "p2": x2}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.array(batch["image"])).to(self.dev)
        x = (x.permute(0, 3, 1, 2).float() / 255.0).contiguous(memory_format=torch.channels_last)
        y = torch.from_numpy(np.array(batch["label"], dtype=np.int64)).to(self.dev)
        index = np.asarray(batch["index"])
        result = self.compute(x, y, index)
        add(self.progress, len(index))
        if self.mode == "perturbation":
            return {"index": index, "label": batch["label"], "p_hat": result["p_hat"].cpu().numpy()}
        return dict(batch) | {name: to_hwc_uint8(t) for name, t in result.items()}


NOISE_BLOCK = 256


def row_normal(
    seed: int, index: np.ndarray, shape: tuple[int, ...], dev: torch.device
) -> torch.Tensor:
    """N(0, 1) noise of `shape` per row, from a generator seeded by (seed, the row's index)."""
    rows = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
        for i in index
    ]
    return torch.stack(rows).to(dev)


def block_normal(
    seed: int, index: np.ndarray, shape: tuple[int, ...], dev: torch.device
) -> torch.Tensor:
    """N(0, 1) noise of `shape` per row, drawn on `dev`: row i is row i % NOISE_BLOCK of one
    draw seeded by (seed, i // NOISE_BLOCK), so a row's noise does not depend on its batch."""
    idx = torch.from_numpy(np.array(index, dtype=np.int64))  # a copy: Ray may hand views
    block = idx // NOISE_BLOCK
    out = torch.empty((len(idx), *shape), device=dev)
    for b in block.unique().tolist():
        gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + b)
        draw = torch.randn((NOISE_BLOCK, *shape), generator=gen, device=dev)
        rows = (block == b).nonzero().squeeze(1)
        out[rows.to(dev)] = draw[(idx[rows] % NOISE_BLOCK).to(dev)]
    return out


# This process's model for task passes: (the pass and its weights file's identity, the
# model). The weights are written to a temp file and renamed, so a rewrite is a new inode.
_loaded: tuple[tuple[PassSpec, int, int, int], PurifyPass] | None = None


def purify_task(
    batch: dict[str, np.ndarray], spec: PassSpec, progress: BarQueue | None
) -> dict[str, np.ndarray]:
    """A batch through the model of `spec`, loaded once per process (and again when the
    weights file is rewritten, e.g. by a forced rerun)."""
    global _loaded
    st = os.stat(spec.weights)
    key = (spec, st.st_ino, st.st_mtime_ns, st.st_size)
    if _loaded is None or _loaded[0] != key:
        _loaded = (key, PurifyPass(spec))
    _loaded[1].progress = progress
    return _loaded[1](batch)


def to_hwc_uint8(x: torch.Tensor) -> np.ndarray:
    """Floats in [0, 1], (N, C, H, W), to uint8 (N, H, W, C) by rounding (not flooring)."""
    x = torch.round(torch.clamp(x.float(), 0, 1) * 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def gpu_share(actors: int, gpus: float) -> float:
    """Each of `actors` GPU actors' share of a GPU: a whole one while there are GPUs enough,
    else 1/k with k the actors one GPU must hold, so every actor fits on some GPU (two on
    one GPU: 0.5 each; six on four GPUs: 0.5, as 4/6 each would fit only one per GPU)."""
    return 1.0 if gpus >= actors else 1.0 / math.ceil(actors / max(gpus, 1))


def _purify_batches(
    source: DatasetInfo,
    weights: Path,
    cfg: PurifyConfig,
    mode: Mode,
    gpu: bool,
    progress: Progress,
) -> ray.data.Dataset:
    spec = PassSpec(str(weights), cfg, len(source.classes), source.shape[0], mode)
    ds = read_ray(source.path)
    common: dict[str, Any] = {"batch_size": cfg.infer_batch_size, "batch_format": "numpy"}
    if gpu:
        return ds.map_batches(
            PurifyPass,
            fn_constructor_kwargs={"spec": spec, "progress": progress.queue},
            compute=ray.data.ActorPoolStrategy(size=cfg.infer_actors),
            num_gpus=gpu_share(cfg.infer_actors, ray.cluster_resources().get("GPU", 0)),
            **common,
        )
    return ds.map_batches(
        functools.partial(purify_task, spec=spec, progress=progress.queue),
        compute=ray.data.TaskPoolStrategy(size=cfg.infer_actors),
        num_cpus=1,
        **common,
    )


def perturbations(
    source: DatasetInfo, weights: Path, cfg: PurifyConfig, gpu: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p_hat(x) for every row of `source` (z = mu): (index, label, p_hat NCHW float32),
    sorted by index."""
    cfg = cfg.model_copy(update={"sample": False})
    with Progress(source.rows, "p_hat", unit="img") as progress:
        parts = list(
            _purify_batches(source, weights, cfg, "perturbation", gpu, progress).iter_batches(
                batch_size=None, batch_format="numpy"
            )
        )
    index = np.concatenate([p["index"] for p in parts])
    order = np.argsort(index)
    label = np.concatenate([p["label"] for p in parts])[order]
    p_hat = np.concatenate([p["p_hat"] for p in parts])[order]
    return index[order], label, p_hat


def run_pass(
    source: DatasetInfo,
    outputs: dict[str, Path],
    *,
    weights: Path,
    cfg: PurifyConfig,
    mode: Mode,
    gpu: bool,
    lineage: list[dict[str, Any]],
) -> dict[str, Any]:
    """Purify `source` with one stage model and write each output dataset.

    `outputs` maps "image" (and, for "subtract_reconstruct", "p2") to output directories.
    Returns timing: seconds, rows and images/s for this pass; `startup_s` until its first
    batch was done (actor start, model load, first read), `work_s` after it, and the
    steady-state rate over the rows after the first batch.
    """
    start = time.perf_counter()
    names = " + ".join(Path(p).name for p in outputs.values())
    config = {"purify": cfg.to_dict(), "pass": mode, "weights": str(weights)}
    common: dict[str, Any] = {"classes": source.classes, "shape": source.shape, "parents": lineage}
    configs = {"image": config, "p2": config | {"output": "p2"}}
    with Progress(source.rows, f"pass -> {names}", unit="img") as progress:
        ds = _purify_batches(source, weights, cfg, mode, gpu, progress)
        write_ray_images(ds, outputs, configs={c: configs[c] for c in outputs}, **common)
    end = time.perf_counter()
    seconds = end - start
    first = progress.first_update_at or end
    steady_rows = source.rows - progress.first_count
    return {
        "seconds": seconds,
        "rows": source.rows,
        "images_per_s": source.rows / seconds,
        "startup_s": first - start,
        "work_s": end - first,
        "steady_images_per_s": steady_rows / (end - first) if steady_rows > 0 else None,
    }
