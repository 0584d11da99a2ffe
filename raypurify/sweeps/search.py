"""The space's ranges as Optuna distributions (what TPE samples from)."""

from __future__ import annotations

from raypurify.sweeps.space import INTEGER_PARAMETERS, SweepSpace


def distributions(space: SweepSpace) -> dict:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out = {}
    for name, rng in space.parameters.items():
        if rng.choices is not None:
            out[name] = CategoricalDistribution(rng.choices)
        elif name in INTEGER_PARAMETERS:
            out[name] = IntDistribution(int(rng.low), int(rng.high), log=rng.log)
        else:
            out[name] = FloatDistribution(rng.low, rng.high, log=rng.log)
    return out
