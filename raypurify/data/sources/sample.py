"""`cifar10-sample`: a small class-balanced CIFAR-10 subset shipped inside the package.

2,500 train and 1,000 test images, drawn with seed 0 from the offline copy by
scripts/make_cifar10_sample.py and kept as the original JPEG bytes (about 1.2 MB), so the
quickstart runs on any machine with no network and no data directory. 2,500 rows, not
fewer: at 1,000 the demo's class-wise EM did not collapse accuracy (39.4 % against 40.8 %
clean, docs/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from raypurify.data.interchange import read_images
from raypurify.data.spec import DatasetSpec, Source, subset_of

if TYPE_CHECKING:
    from raypurify.data.imageset import ImageSet

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample" / "cifar10-sample"


def load(spec: DatasetSpec) -> ImageSet:
    return subset_of(read_images(SAMPLE_DIR / spec.split), spec)


SOURCE = Source("cifar10-sample", "bundled CIFAR-10 subset (2,500 train / 1,000 test)", load)
