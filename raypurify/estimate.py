"""How long a training step will take on this CPU, said once before it starts.

The paper's settings assume a GPU: EM's min-min with a ResNet-18 surrogate, the `paper`
classifier recipe (ResNet-18, 60 epochs) and the `paper` D-VAE preset (width 64, 60 epochs
per stage) each run for hours on 2 CPU cores, and they are what a newcomer gets by default.
Before such a step starts on CPU workers, one forward-backward pass of its network is timed
here on random data (a second or less) and the step's worst-case image passes are divided
by that rate; above `LONG_S` the user is told, once per step, the estimate and the smaller
setting to use instead. A step of fewer than `MIN_PASSES` passes is not timed at all.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from raypurify.data.imageset import ImageSet

if TYPE_CHECKING:
    from raypurify.data.spec import Stream

LONG_S = 3600.0  # an hour: far beyond what a demo- or protocol-scale CPU run takes
# Fewer image passes than this take under an hour even at 1 image/s: nothing to time.
MIN_PASSES = LONG_S * 1.0


def rate_of(
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    classes: int,
    shape: tuple[int, ...],
    batch: int = 16,
) -> float:
    """Images/s of `loss(x, y).backward()` on random images of `shape` on this CPU, after
    a warm-up (`loss` holds the network)."""
    torch.manual_seed(0)
    x = torch.rand(batch, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        loss(x, y).backward()
        times.append(time.perf_counter() - t0)
    return batch / min(times[1:])


def train_rate(model: torch.nn.Module, classes: int, shape: tuple[int, ...], batch: int) -> float:
    """Images/s of SGD forward-backward passes of a classifier `model` on this CPU."""
    model = model.to(memory_format=torch.channels_last).train()
    return rate_of(lambda x, y: F.cross_entropy(model(x), y), classes, shape, batch)


# Rates measured in this process, by what was measured: a run's later steps of the same
# network do not time it again.
_rates: dict[Hashable, float] = {}


def warn_if_long(
    what: str, passes: float, measure: Callable[[], float], hint: str, key: Hashable = None
) -> float | None:
    """Estimate `passes` image forward-backward passes at the rate `measure()` times on
    this CPU (once per `key`, if given); print one line to stderr if that is over
    `LONG_S`. Returns the estimate in seconds (None for a step too small to time)."""
    if passes < MIN_PASSES:
        return None
    if key is None:
        rate = measure()
    else:
        if key not in _rates:
            _rates[key] = measure()
        rate = _rates[key]
    seconds = passes / rate
    if seconds > LONG_S:
        print(
            f"{what}: up to {passes:,.0f} image passes at {rate:,.0f} img/s on this CPU, "
            f"about {seconds / 3600:.1f} h; {hint}",
            file=sys.stderr,
        )
    return seconds


def warn_if_long_training(
    what: str,
    data: ImageSet | Stream,
    epochs: int,
    rate: Callable[[int, tuple[int, int, int]], float],
    hint: str,
    key: tuple[Hashable, ...],
) -> None:
    """`warn_if_long` for `epochs` over `data`, the network timed by `rate(classes,
    (c, h, w))` once per `key` and data shape. A stream of unknown length is not estimated."""
    rows = len(data) if isinstance(data, ImageSet) else data.rows
    if rows is None:
        return
    classes, (h, w, c) = len(data.classes), data.shape
    measure = functools.partial(rate, classes, (c, h, w))
    warn_if_long(what, epochs * rows, measure, hint, (*key, classes, data.shape))
