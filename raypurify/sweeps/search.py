"""The space's ranges as Optuna distributions (what TPE samples from)."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from raypurify.sweeps.space import INTEGER_PARAMETERS, SweepSpace

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution


def distributions(space: SweepSpace) -> dict[str, BaseDistribution]:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    out: dict[str, BaseDistribution] = {}
    for name, rng in space.parameters.items():
        # A range without choices has low and high (ParameterRange's validator).
        if rng.choices is not None:
            out[name] = CategoricalDistribution(rng.choices)
        elif name in INTEGER_PARAMETERS:
            out[name] = IntDistribution(
                int(cast(float, rng.low)), int(cast(float, rng.high)), log=rng.log
            )
        else:
            out[name] = FloatDistribution(cast(float, rng.low), cast(float, rng.high), log=rng.log)
    return out
