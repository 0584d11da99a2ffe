"""raypurify: defend against unlearnable examples with rate-constrained VAEs, on Ray."""

import os

__version__ = "0.1.0"

# Ray Data 2.60 starts 32 actors to read parquet footers on every read_parquet, which costs
# seconds per read on a small machine; our datasets have a handful of files each. The
# constant is read when ray.data is imported, hence here. Set the variable to override.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")
