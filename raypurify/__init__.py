"""raypurify: defend against unlearnable examples with rate-constrained VAEs, on Ray."""

import os

__version__ = "0.1.0"

# Ray Data 2.60 starts 32 actors to read parquet footers on every read_parquet, which costs
# seconds per read on a small machine; our datasets have a handful of files each. The
# constant is read when ray.data is imported, hence here. Set the variable to override.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")

# Ray Train's controller polls its workers every 2 s and starts a preemption watcher (for
# spot nodes being drained); each run then spends seconds noticing start and finish. Poll
# every 0.25 s and skip the watcher, so a short fit is not mostly waiting (bench/demo.py
# measures each step's start-up). Ray Train passes both variables from the driver to its
# controller and workers, on a cluster too; set them to override.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
