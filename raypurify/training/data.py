"""How training batches reach a worker: from uint8 tensors in memory, or from Ray Data.

Small sets (CIFAR-size) travel once through the object store and each worker draws its
share of a seeded per-epoch permutation, so every worker takes the same number of steps
(DDP needs that) and a resumed run sees the same order. Large sets, or any set when asked,
stream through Ray Data (`get_dataset_shard`). Classifiers and D-VAE stages share this.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import ray
import torch

from raypurify.data.imageset import ImageSet
from raypurify.data.interchange_ray import imageset_to_ray
from raypurify.data.spec import Stream

if TYPE_CHECKING:
    import ray.train  # imported by Ray Train before workers run
    from ray.data import DataIterator

MEMORY_LIMIT_BYTES = 2 * 1024**3


def pack(data: ImageSet) -> dict[str, np.ndarray]:
    """Arrays to ship to workers: images as (N, C, H, W) uint8, labels int64."""
    images = np.ascontiguousarray(data.images.transpose(0, 3, 1, 2))
    return {"images": images, "labels": data.labels}


def unpack(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    # Copies: the object store hands out read-only buffers.
    return torch.from_numpy(arrays["images"].copy()), torch.from_numpy(arrays["labels"].copy())


DataPath = Literal["auto", "memory", "ray_data"]


@dataclass(frozen=True)
class Shipped:
    """How a worker finds its training rows: their count, and `arrays` (an object ref to
    `pack`'s arrays) when they travel in memory; else Ray Train's "train" dataset shard."""

    rows: int
    arrays: Any = None


def in_memory(nbytes: int, data_path: DataPath = "auto") -> bool:
    """Whether `ship` hands a set of `nbytes` decoded images to the workers through the
    object store: by default when it fits in MEMORY_LIMIT_BYTES."""
    return data_path == "memory" or (data_path == "auto" and nbytes <= MEMORY_LIMIT_BYTES)


def ship(
    data: ImageSet | Stream, data_path: DataPath = "auto"
) -> tuple[Shipped, dict[str, Any] | None]:
    """Bring `data` to the workers: (what the loop's job carries, the `datasets` for Ray
    Train). In memory unless `data_path` is "ray_data", the data is a Stream, or it is
    larger than MEMORY_LIMIT_BYTES decoded."""
    if isinstance(data, ImageSet):
        if in_memory(data.images.nbytes, data_path):
            return Shipped(len(data), arrays=ray.put(pack(data))), None
        data = Stream(imageset_to_ray(data), data.classes, data.shape, len(data), data.name)
    rows = data.rows if data.rows is not None else data.ds.count()
    return Shipped(rows), {"train": data.ds}


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """This worker's rows for `epoch`: an equal share of a seeded permutation."""
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    per_worker = n // world
    return torch.from_numpy(perm[rank * per_worker : (rank + 1) * per_worker])


class EpochBatches:
    """In a worker: this worker's (uint8 NCHW images, labels) batches for each epoch."""

    def __init__(
        self,
        shipped: Shipped,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        device: torch.device,
    ):
        self.batch_size, self.seed, self.rank, self.world, self.device = (
            batch_size,
            seed,
            rank,
            world,
            device,
        )
        self.rows = shipped.rows
        self.steps = max(1, (self.rows // world) // batch_size)
        self.shard: DataIterator | None
        if shipped.arrays is not None:
            self.images, self.labels = unpack(ray.get(shipped.arrays))
            self.shard = None
        else:
            self.shard = ray.train.get_dataset_shard("train")

    def __call__(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.shard is not None:
            yield from self._from_shard(epoch)
            return
        order = epoch_order(self.rows, self.seed, epoch, self.rank, self.world)
        bs = self.batch_size
        for i in range(0, len(order) - bs + 1, bs):  # full batches only
            idx = order[i : i + bs]
            yield (
                self.images[idx].to(self.device, non_blocking=True),
                self.labels[idx].to(self.device, non_blocking=True),
            )

    def _from_shard(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Only called with a shard (see __call__).
        batches = cast("DataIterator", self.shard).iter_torch_batches(
            batch_size=self.batch_size,
            local_shuffle_buffer_size=4 * self.batch_size,
            local_shuffle_seed=self.seed * 100_003 + epoch,
            drop_last=True,
            device=self.device,
        )
        for step, batch in enumerate(batches):
            if step == self.steps:  # equal step counts across workers (DDP)
                return
            yield batch["image"].permute(0, 3, 1, 2), batch["label"]
