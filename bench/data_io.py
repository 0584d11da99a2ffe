"""Data I/O throughput of the interchange format, on the real CIFAR-10 train set.

Measures images/s for five steps over the same images:

  a. decode the offline JPEG parquet in-process      (sources.cifar.read_offline)
  b. write our format in-process                     (interchange.write_images)
  c. read it back in-process                         (interchange.read_images)
  d. write our format through Ray Data               (imageset_to_ray + write_ray)
  e. read it back through Ray Data                   (read_ray, iter_batches to the end)

Each step runs once, wall clock, on a local Ray started by `raypurify.runtime.init_ray()`
(or the cluster in RAY_ADDRESS), after an untimed warm-up that starts Ray's workers. The Ray
steps still include Ray Data's per-pipeline fixed costs (planning, and for reads the parquet
footer listing, which in Ray 2.60 starts a pool of FooterReader actors on every read).

Run from the repository root (takes a few minutes on 2 cores):

    source /work/venv/bin/activate   # or any environment with raypurify installed
    python bench/data_io.py                      # all 50,000 train images
    python bench/data_io.py --rows 5000          # a quicker run
    python bench/data_io.py --data-dir /path/to/data --out-dir /tmp/io   # keep the outputs

The offline copy is read from DATA_DIR/cifar10/train.parquet, DATA_DIR being --data-dir,
else $RAYPURIFY_DATA_DIR, else ../shared/data beside the repository. The table is printed
and written to bench/results/data_io.md and bench/results/data_io.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raypurify.data.codec import decode_batch
from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import read_images, write_images
from raypurify.data.interchange_ray import imageset_to_ray, read_ray, write_ray
from raypurify.data.sources.cifar import read_offline
from raypurify.runtime import init_ray

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def default_data_dir() -> Path:
    return Path(os.environ.get("RAYPURIFY_DATA_DIR") or REPO.parent / "shared" / "data")


def decode_offline(file: Path, rows: int) -> ImageSet:
    """Step (a): the whole file through `read_offline`, or `rows` evenly spaced rows of it
    through the same decoder (so a smaller run still covers every class)."""
    total = pq.read_metadata(file).num_rows
    if rows >= total:
        return read_offline(file)
    table = pq.read_table(file, columns=["image", "label"])
    index = np.unique(np.linspace(0, total - 1, rows).round().astype(np.int64))
    table = table.take(index)
    classes = pq.read_schema(file).metadata[b"classes"].decode().split(",")
    images = decode_batch(table["image"].to_pylist(), None, where=str(file), ids=index)
    return ImageSet(images, table["label"].to_numpy(), index, classes, name=str(file))


def timed(name: str, fn):
    """Run fn once; return its result, wall seconds and this process's CPU seconds."""
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"  {name}: {seconds:.2f} s (this process: {cpu:.2f} s CPU)", flush=True)
    return result, seconds, cpu


def run(data_dir: Path, out_dir: Path, rows: int) -> dict:
    file = data_dir / "cifar10" / "train.parquet"
    if not file.exists():
        raise SystemExit(f"{file} not found: pass --data-dir or set RAYPURIFY_DATA_DIR")
    steps = []

    def record(step: str, images: int, seconds: float, cpu: float) -> None:
        steps.append(
            {
                "step": step,
                "images": int(images),
                "seconds": round(seconds, 3),
                "images_per_s": round(images / seconds, 1),
                "driver_cpu_seconds": round(cpu, 3),  # excludes Ray workers' CPU time
            }
        )

    print(f"decoding {file}", flush=True)
    data, s, cpu = timed("a. decode offline JPEG parquet", lambda: decode_offline(file, rows))
    n = len(data)
    record("a. decode offline JPEG parquet (in-process)", n, s, cpu)

    local = out_dir / "local"
    info, s, cpu = timed("b. write_images", lambda: write_images(data, local, overwrite=True))
    record("b. write interchange format (in-process, write_images)", info.rows, s, cpu)

    back, s, cpu = timed("c. read_images", lambda: read_images(local))
    record("c. read interchange format (in-process, read_images)", len(back), s, cpu)
    if not np.array_equal(back.images, data.images):
        raise SystemExit("in-process round trip changed pixels")
    del back

    init_ray()
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 0))
    # Warm-up, not timed: start Ray's worker processes once, as a long-running job would have.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.range(64, override_num_blocks=cpus or 1).map_batches(lambda b: b).take_all()
    via_ray = out_dir / "ray"

    def ray_write():
        ds = imageset_to_ray(data)
        return write_ray(ds, via_ray, classes=data.classes, shape=data.shape, overwrite=True)

    ray_info, s, cpu = timed("d. imageset_to_ray + write_ray", ray_write)
    record("d. write interchange format (Ray Data, write_ray)", ray_info.rows, s, cpu)
    if ray_info.sha256 != info.sha256:
        raise SystemExit("Ray Data and in-process writers disagree on the content")

    def ray_read() -> int:
        count = 0
        for batch in read_ray(via_ray).iter_batches(batch_size=1024):
            count += len(batch["label"])
        return count

    count, s, cpu = timed("e. read_ray + iter_batches", ray_read)
    if count != n:
        raise SystemExit(f"Ray Data read {count} rows, expected {n}")
    record("e. read interchange format (Ray Data, read_ray + iter_batches)", count, s, cpu)

    return {
        "benchmark": "data_io",
        "dataset": str(file),
        "rows": n,
        "steps": steps,
        "bytes": {
            "offline_jpeg_parquet": file.stat().st_size,
            "interchange_png_parquet": sum(f.stat().st_size for f in info.files),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "ray_cpus": cpus,
            "python": platform.python_version(),
            "ray": ray.__version__,
            "platform": platform.platform(),
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def markdown(result: dict) -> str:
    lines = [
        "| step | images | seconds | images/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for s in result["steps"]:
        lines.append(
            f"| {s['step']} | {s['images']:,} | {s['seconds']:.2f} | {s['images_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="holds cifar10/train.parquet")
    parser.add_argument("--out-dir", type=Path, default=None, help="outputs (temporary if unset)")
    parser.add_argument("--rows", type=int, default=50_000, help="images to use (max 50,000)")
    args = parser.parse_args()

    data_dir = args.data_dir or default_data_dir()
    load_before = os.getloadavg()
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        result = run(data_dir, args.out_dir, args.rows)
    else:
        with tempfile.TemporaryDirectory(prefix="raypurify-bench-") as tmp:
            result = run(data_dir, Path(tmp), args.rows)
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}

    table = markdown(result)
    m = result["machine"]
    header = (
        f"# Data I/O: CIFAR-10 train, {result['rows']:,} images\n\n"
        f"{result['date']}, {m['cpus']} CPU cores (Ray: {m['ray_cpus']}), Python {m['python']}, "
        f"Ray {m['ray']}; 1-minute load average {load_before[0]:.1f} before, "
        f"{result['load_average']['after'][0]:.1f} after. Wall clock, one run per step.\n"
        f"Sizes: offline JPEG parquet {result['bytes']['offline_jpeg_parquet'] / 2**20:.1f} MiB "
        f"(all 50,000), interchange PNG parquet "
        f"{result['bytes']['interchange_png_parquet'] / 2**20:.1f} MiB.\n\n"
    )
    print()
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data_io.json").write_text(json.dumps(result, indent=2) + "\n")
    cpu = ", ".join(f"{s['step'][0]} {s['driver_cpu_seconds']:.1f}" for s in result["steps"])
    footer = (
        f"\nCPU seconds of the driver process per step: {cpu}. Steps a-c run in it alone, so "
        "on a busy machine their CPU time is closer to what they take undisturbed; d-e run in "
        "Ray's workers, whose CPU time is not counted.\n"
    )
    (RESULTS / "data_io.md").write_text(header + table + "\n" + footer)
    print(f"\nwrote {RESULTS / 'data_io.md'} and {RESULTS / 'data_io.json'}")


if __name__ == "__main__":
    main()
