"""Craft the demo's class-wise EM poison on the bundled sample and ship it as ten patterns.

    python scripts/make_demo_poison.py            # craft (1.5 min on 2 AVX2 cores)
    python scripts/make_demo_poison.py --from DIR # take the patterns from a poisoned dataset

Class-wise EM (Huang et al. 2021) adds one pattern per class, so the whole poison is ten
3 x 32 x 32 arrays of grey levels in [-8, 8]: 30 KB, where crafting it takes a fifth of the
demo's wall on a slow CPU. The demo imports it the way the paper's tables use the authors'
released poisons (`released:` in the preset). The patterns are read back from the poisoned
images exactly (every pixel some image of the class leaves unclipped), and the script
checks that adding them back to the clean images rebuilds the poisoned ones to the bit.

Writes raypurify/data/sample/poisons/cifar10-sample-em-class.{npy,json}; the JSON records the
settings, the seed, the machine and the sha256 of the file.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np

from raypurify.atomic import write_bytes
from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import read_images
from raypurify.data.registry import load
from raypurify.data.spec import DatasetSpec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from common import machine  # noqa: E402

OUT = REPO / "raypurify/data/sample/poisons"
NAME = "cifar10-sample-em-class"
# The settings the demo crafted with before it shipped the poison (docs/RESULTS.md).
SETTINGS = {
    "granularity": "class",
    "surrogate": "fast-resnet",
    "surrogate_options": {"width": 16},
    "batch_size": 128,
    "portion": 0.5,
    "max_rounds": 20,
    "ratio": 1.0,
    "seed": 0,
}


def patterns(clean: ImageSet, poisoned: ImageSet) -> np.ndarray:
    """The class-wise grey-level patterns (K, C, H, W) behind `poisoned`, exactly."""
    if not (np.array_equal(clean.labels, poisoned.labels) and clean.shape == poisoned.shape):
        raise SystemExit("the poisoned dataset is not a poison of the bundled sample")
    delta = poisoned.images.astype(np.int16) - clean.images.astype(np.int16)
    reached = clean.images.astype(np.int16) + delta
    free = (reached > 0) & (reached < 255)  # not clipped: the pattern shows whole
    out = np.zeros((clean.num_classes, *clean.shape), np.int16)
    for k in range(clean.num_classes):
        rows = clean.labels == k
        low = np.where(free[rows], delta[rows], 99).min(0)
        high = np.where(free[rows], delta[rows], -99).max(0)
        if not np.array_equal(low[high > -99], high[high > -99]):
            raise SystemExit(f"class {k}: the perturbations differ between images: not class-wise")
        out[k] = np.where(high > -99, high, 0)
    rebuilt = np.clip(clean.images.astype(np.int16) + out[clean.labels], 0, 255)
    if not np.array_equal(rebuilt.astype(np.uint8), poisoned.images):
        raise SystemExit("the patterns do not rebuild the poisoned images")
    return out.transpose(0, 3, 1, 2).astype(np.int8)  # K C H W


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="source", help="a poisoned dataset folder of the sample")
    args = ap.parse_args()
    clean = load(DatasetSpec(name="cifar10-sample", split="train"))
    if args.source:
        poisoned, made = read_images(Path(args.source)), f"read from {args.source}"
    else:
        from raypurify.attacks.base import poison

        poisoned, _ = poison(clean, "em", settings=SETTINGS)
        made = "crafted by scripts/make_demo_poison.py"
    noise = patterns(clean, poisoned)
    buffer = io.BytesIO()
    np.save(buffer, noise)
    data = buffer.getvalue()
    write_bytes(OUT / f"{NAME}.npy", data)  # under a temporary name, then renamed
    record = {
        "attack": "em",
        "settings": SETTINGS,
        "made": made,
        "machine": machine(),
        "shape": list(noise.shape),
        "units": "grey levels",
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_bytes(OUT / f"{NAME}.json", (json.dumps(record, indent=2) + "\n").encode())
    print(f"{OUT / NAME}.npy: {noise.shape}, grey levels {noise.min()}..{noise.max()}")


if __name__ == "__main__":
    main()
