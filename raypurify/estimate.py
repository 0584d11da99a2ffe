"""How long a surrogate-training step will take on this CPU, said once before it starts.

The paper's settings assume a GPU: EM's min-min with a ResNet-18 surrogate runs for hours
on 2 CPU cores, and nothing said so. Before such a step starts on CPU workers, one
forward-backward pass of its network is timed here on random data (a second or two) and
the step's worst-case image passes are divided by that rate; above `LONG_S` the user is
told, once per step, the estimate and the smaller setting to use instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

LONG_S = 3600.0  # an hour: far beyond what a demo- or protocol-scale CPU run takes


def train_rate(model: torch.nn.Module, classes: int, shape: tuple[int, ...], batch: int) -> float:
    """Images/s of SGD forward-backward passes of `model` on this CPU, after a warm-up."""
    torch.manual_seed(0)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.rand(batch, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - t0)
    return batch / min(times[1:])


def warn_if_long(
    what: str,
    passes: float,
    build: Callable[[], torch.nn.Module],
    classes: int,
    shape: Sequence[int],
    hint: str,
) -> float:
    """Estimate `passes` image forward-backward passes of `build()`'s network on this CPU;
    print one line to stderr if that is over `LONG_S`. Returns the estimate in seconds."""
    rate = train_rate(build(), classes, tuple(shape), batch=16)
    seconds = passes / rate
    if seconds > LONG_S:
        print(
            f"{what}: up to {passes:,.0f} image passes at {rate:,.0f} img/s on this CPU, "
            f"about {seconds / 3600:.1f} h; {hint}",
            file=sys.stderr,
        )
    return seconds
