"""`raypurify train`: data in, defence applied, classifier trained, metrics out.

The output directory names the run: rerunning with the same --out resumes from the last
epoch checkpoint, and a defended training set already written there is reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raypurify import defenses
from raypurify.data import registry
from raypurify.data.interchange import read_images
from raypurify.defenses.apply import reuse, transform_dataset
from raypurify.errors import ConfigError
from raypurify.models import ARCHS
from raypurify.runtime import init_ray
from raypurify.tracking import active_run, start_run
from raypurify.training.config import recipe
from raypurify.training.trainer import train_classifier


def run_training(
    data: str,
    test: str,
    out: str | Path,
    *,
    recipe_name: str = "paper",
    arch: str | None = None,
    defense: str = "none",
    overrides: list[str] = (),
    num_cpus: int | None = None,
) -> dict[str, Any]:
    preset = [f"arch={arch}"] if arch else []
    cfg = recipe(recipe_name, [*preset, f"defense.name={defense}", *overrides])
    ARCHS.get(cfg.arch, key="arch")  # before a defended set is written, not after
    chosen, options = defenses.options(cfg.defense.name, cfg.defense.options)
    if chosen.kind == "purify":
        raise ConfigError(
            f"defense.name: '{chosen.name}' is a purifier; run `raypurify purify` first and "
            "train on its p3/ output"
        )
    out = Path(out)
    train_spec = registry.spec_for(data, split="train")
    test_set = registry.load(registry.spec_for(test, split="test"))
    init_ray(num_cpus)
    if chosen.kind == "transform":
        defended = out / "defended"
        info = reuse(defended)
        if info is None:
            parent = {"source": data}
            info = transform_dataset(
                chosen, options, registry.stream(train_spec), defended, parents=[parent]
            )
        train_set = read_images(info.path)
    else:
        train_set = registry.load(train_spec)
    run = start_run(
        "train",
        f"{cfg.arch}-{chosen.name}-{out.name}",
        params={"data": data, "test": test, "recipe": recipe_name, **cfg.to_dict()},
    )
    with active_run(run):
        return train_classifier(train_set, test_set, cfg, out, run=run)
