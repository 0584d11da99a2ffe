"""Is a poison in the images' brightness or in their colour, and which does each purifier pass?

JPEG quantises colour far more coarsely than brightness (and subsamples it), grayscale drops
colour outright, and the D-VAE's squared error weighs both alike. If a poison lived in colour,
where images hold little of their energy, a purifier that gives colour less could drop it at
little cost to the image. This benchmark splits each poisoned row's perturbation, each clean
image (its mean removed) and each purifier's output into three orthonormal colour components
(luma (R + G + B) / sqrt 3; chroma (R - G) / sqrt 2 and (R + G - 2B) / sqrt 6) and reports per
component:
- poison / image: the share of the poison's and of the clean images' energy in it;
- response: the share of the poison's component that the purifier's own change passes
  (<out(poisoned) - out(clean), delta> / <delta, delta>, as bench/p3_passes.py's response);
- clean_mse: the purifier's squared error on the clean rows in that component (0-255 scale).
The purifiers are JPEG-10 and the P3s that bench/p3_passes.py --save wrote.

    python bench/p3_passes.py --poison tap10k --clean clean10k --rows 9000 --held 1000 \
        --passes 1 --save p3
    python bench/colour_split.py --poison tap10k --clean clean10k --dvae p3

Results: bench/results/colour_split-<poison dir name>[-<label>][-<cpu kind>].{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402
from in_process import by_index  # noqa: E402
from residual_swap import outputs  # noqa: E402

from raypurify.data.interchange import read_images  # noqa: E402

COMPONENTS = ("luma", "chroma R-G", "chroma Y-B")
BASIS = np.array([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=np.float64)
BASIS /= np.linalg.norm(BASIS, axis=1, keepdims=True)


def split(x: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) images -> (3, N, H, W): their luma and two chroma components."""
    return np.einsum("nhwc,kc->knhw", x.astype(np.float64), BASIS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--poison", required=True, help="a poisoned dataset (interchange format)")
    ap.add_argument("--clean", required=True, help="the clean dataset it was made from")
    ap.add_argument("--dvae", required=True, help="bench/p3_passes.py --save's folder")
    ap.add_argument("--passes", default="1", help="which of its P3s (p3-*-PASSES)")
    ap.add_argument("--label", default="", help="the result file's variant name")
    args = ap.parse_args()
    rows = read_images(Path(args.dvae) / f"p3-poisoned-{args.passes}")
    x0 = by_index(read_images(args.poison), rows.index).astype(np.float64)
    xc = by_index(read_images(args.clean), rows.index).astype(np.float64)
    delta, clean = split(x0 - xc), split(xc)
    centred = clean - clean.mean(axis=(2, 3), keepdims=True)
    poison_energy = (delta**2).sum(axis=(1, 2, 3))
    image_energy = (centred**2).sum(axis=(1, 2, 3))
    table = []
    for name, spec in (("JPEG-10", "jpeg"), ("D-VAE", args.dvae)):
        out = outputs(spec, args.passes, args.poison, args.clean, rows)
        change, out_clean = split(out["poisoned"] - out["clean"]), split(out["clean"])
        for k, component in enumerate(COMPONENTS):
            table.append(
                {
                    "purifier": name,
                    "component": component,
                    "poison": float(poison_energy[k] / poison_energy.sum()),
                    "image": float(image_energy[k] / image_energy.sum()),
                    "response": float((change[k] * delta[k]).sum() / poison_energy[k]),
                    "clean_mse": float(((out_clean[k] - clean[k]) ** 2).mean()),
                }
            )
    notes = f"Poison {args.poison}; the {len(rows)} rows of {args.dvae}, P3 of {args.passes} pass."
    tag = f"-{args.label}" if args.label else ""
    columns = ["purifier", "component", "poison", "image", "response", "clean_mse"]
    write_results(f"colour_split-{Path(args.poison).name}{tag}", table, columns, notes)


if __name__ == "__main__":
    main()
