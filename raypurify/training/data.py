"""How training batches reach a worker: from uint8 tensors in memory, or from Ray Data.

Small sets (CIFAR-size) travel once through the object store and each worker draws its
shard of a seeded per-epoch permutation, so every worker takes the same number of steps
(DDP needs that) and a resumed run sees the same order. Large sets stream through Ray
Data's `get_dataset_shard`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from raypurify.data.imageset import ImageSet

MEMORY_LIMIT_BYTES = 2 * 1024**3


def pack(data: ImageSet) -> dict[str, np.ndarray]:
    """Arrays to ship to workers: images as (N, C, H, W) uint8, labels int64."""
    return {
        "images": np.ascontiguousarray(data.images.transpose(0, 3, 1, 2)),
        "labels": data.labels,
    }


def unpack(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    # Copies: the object store hands out read-only buffers.
    return torch.from_numpy(arrays["images"].copy()), torch.from_numpy(arrays["labels"].copy())


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """This worker's rows for `epoch`: an equal share of a seeded permutation."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_worker = n // world
    return torch.from_numpy(perm[rank * per_worker : (rank + 1) * per_worker])


def memory_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Full batches only (the last partial one is dropped, a different one each epoch)."""
    for i in range(0, len(rows) - batch_size + 1, batch_size):
        idx = rows[i : i + batch_size]
        yield images[idx].to(device, non_blocking=True), labels[idx].to(device, non_blocking=True)


def ray_batches(shard, batch_size: int, seed: int, epoch: int, device: torch.device):
    """Batches from a Ray Data shard: (N, H, W, C) uint8 rows become (N, C, H, W)."""
    for batch in shard.iter_torch_batches(
        batch_size=batch_size,
        local_shuffle_buffer_size=4 * batch_size,
        local_shuffle_seed=seed * 100_003 + epoch,
        drop_last=True,
        device=device,
    ):
        yield batch["image"].permute(0, 3, 1, 2), batch["label"]
