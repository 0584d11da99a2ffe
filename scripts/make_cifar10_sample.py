"""Build the bundled `cifar10-sample` dataset from the offline CIFAR-10 copy.

    python scripts/make_cifar10_sample.py [--data ../shared/data/cifar10]

Draws a class-balanced subset (2,500 train, 1,000 test; seed 0) and writes it in the
interchange format under raypurify/data/sample/cifar10-sample/{train,test}, keeping the
original JPEG bytes (re-encoding as PNG would nearly triple the size).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypurify.data.imageset import balanced_rows
from raypurify.data.interchange import schema, write_tables
from raypurify.data.sources.sample import SAMPLE_DIR

SIZES = {"train": 2500, "test": 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/cifar10", help="offline copy folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for split, n in SIZES.items():
        file = Path(args.data) / f"{split}.parquet"
        table = pq.read_table(file, columns=["image", "label"])
        classes = pq.read_schema(file).metadata[b"classes"].decode().split(",")
        labels = table["label"].to_numpy()
        rows = balanced_rows(labels, n, len(classes), args.seed, str(file))
        out = pa.table(
            {
                "image": table["image"].take(rows),
                "label": pa.array(labels[rows]),
                "index": pa.array(rows.astype(np.int64)),
            },
            schema=schema(classes, (32, 32, 3), poisoned=False),
        )
        config = {"source": str(file.name), "subset": n, "seed": args.seed, "encoding": "jpeg"}
        parents = [{"source": "cifar10", "split": split, "file": str(file.name)}]
        info = write_tables(
            [out], SAMPLE_DIR / split, config=config, parents=parents, overwrite=True
        )
        print(f"{split}: {info.rows} rows -> {info.path} (sha256 {info.sha256[:16]})")


if __name__ == "__main__":
    main()
