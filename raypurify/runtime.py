"""Where code runs: the Ray cluster, the torch device, precision and seeds.

This is the one place that starts or joins Ray. With RAY_ADDRESS set (a cluster, or
`ray job submit`, which sets it) we join that cluster; otherwise we start a local Ray
with a bounded object store so a laptop or a 2-core CI box is not swamped, and with every
Ray service (GCS, raylet, workers, agents) listening on 127.0.0.1 only: by default a
local Ray on Linux listens on all interfaces, where anyone on the network could reach
services that run code. See cluster/README.md for what to firewall on a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field

DEFAULT_OBJECT_STORE_BYTES = 2 * 1024**3


def init_ray(num_cpus: int | None = None, *, object_store_bytes: int | None = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray (idempotent)."""
    import ray

    if num_cpus is not None and num_cpus < 1:  # a local Ray with no CPU waits forever
        from raypurify.errors import ConfigError

        raise ConfigError(f"--num-cpus: {num_cpus} is not at least 1")
    if ray.is_initialized():
        return
    quiet_logs()
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    # Workers' own output (Ray Train's and Ray Data's internals, mostly) stays in Ray's log
    # files; our progress bars, MLflow and raised errors carry what the user needs.
    verbose = os.environ.get("RAYPURIFY_VERBOSE") == "1"
    # Ray's own INFO lines ("Started a local Ray instance.") say nothing the user acts on.
    level = logging.INFO if verbose else logging.WARNING
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=verbose, logging_level=level)
        return
    store = object_store_bytes or int(
        os.environ.get("RAYPURIFY_OBJECT_STORE_BYTES", DEFAULT_OBJECT_STORE_BYTES)
    )
    loopback_only()
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        num_cpus=num_cpus,
        object_store_memory=store,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=level,
    )


def loopback_only() -> None:
    """Make a local Ray's node address 127.0.0.1, so its gRPC servers and agents bind there.

    Ray turns a loopback node address into the machine's outward IP (and then listens on
    all interfaces) unless clustering is off, which it is by default only on macOS and
    Windows: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 turns it off here too. The variable
    reaches the processes Ray starts; this process read it when `ray` was imported, so the
    constant is set as well. RAYPURIFY_RAY_ALL_INTERFACES=1 keeps Ray's default.
    """
    if os.environ.get("RAYPURIFY_RAY_ALL_INTERFACES") == "1":
        return
    from raypurify.ray_private import disable_clustering

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    disable_clustering()


def quiet_logs() -> None:
    """Ray Data logs every operator's progress at INFO (a screenful per dataset when stdout is
    not a terminal); we draw our own bars, so keep its errors only. Ray's notice of its
    default token auth goes too (`token_auth_notice`), and the raylet's warning that it has
    started four times (then five, ...) more worker processes than it starts at once: Ray
    Train starts four zero-CPU actors per run beside its workers (controller, placement
    group cleaner, synchronisation, dataset manager), Ray Data two, a warm group its job
    board and progress queue, so a 2-core machine trips it in every demo, where it reads
    as a fault ("tasks blocked in ray.get()") that is not there. A sweep draws its own
    table of trials, so Ray Tune's output goes as well: its INFO logs, and the box and
    hints (a TensorBoard command for a folder under /tmp) that its new output engine
    prints even at `verbose=0`; the old engine prints nothing there. RAYPURIFY_VERBOSE=1
    restores all of it."""
    if os.environ.get("RAYPURIFY_VERBOSE") == "1":
        return
    from ray.data import DataContext

    from raypurify.ray_private import auth_notice_logger, drop_worker_pool_notice

    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    auth = auth_notice_logger()
    if token_auth_notice not in auth.filters:
        auth.addFilter(token_auth_notice)
    drop_worker_pool_notice()


def token_auth_notice(record: logging.LogRecord) -> bool:
    """Drops Ray's WARNING that a new local Ray has token authentication on, its default,
    printed by every command; auth stays on (its token in ~/.ray/auth_token) and the
    warning that it is off still shows."""
    return not record.getMessage().startswith("Token authentication is enabled")


def device() -> torch.device:
    """CUDA when this process sees a GPU, else CPU (decided at run time, never configured)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def env_decides_auto(precision: str) -> str:
    """A precision with "auto" made concrete by RAYPURIFY_PRECISION (fp32 or bf16) where that
    is set. Applied to every config's `precision` as it is read, so the variable acts as
    `--set precision=...` on each config left at auto: part of what a result is reused
    for (a bf16 result is not reused when fp32 is asked for), and refused before any work
    when it is neither."""
    if precision != "auto":
        return precision
    # any case; set but empty reads as unset
    chosen = os.environ.get("RAYPURIFY_PRECISION", "").strip().lower() or "auto"
    if chosen not in ("auto", "fp32", "bf16"):
        from raypurify.errors import ConfigError

        raise ConfigError(f"RAYPURIFY_PRECISION: {chosen!r} is not fp32 or bf16")
    return chosen


Precision = Annotated[
    Literal["auto", "bf16", "fp32"],
    AfterValidator(env_decides_auto),
    Field(validate_default=True),  # "auto" as a default is read through it too
]


def use_bf16(precision: str, dev: torch.device) -> bool:
    """Whether to run under bf16 autocast. "auto": on CUDA yes; on a CPU where bf16 measured
    faster than fp32: one with AMX, or an AMD one with AVX-512-BF16.

    Measured on the 2-core kinds this project runs on (docs/RESULTS.md, "Precision on each
    CPU kind"): with AMX bf16 trains 1.3-2.7x faster; on an AMD EPYC with AVX-512-BF16
    (Zen 4) 1.2-1.8x faster; on an Intel Xeon with AVX-512-BF16 but no AMX 30-40 % slower;
    with AVX2 alone bf16 is emulated. `precision: bf16` forces autocast anywhere.
    RAYPURIFY_PRECISION (fp32 or bf16) decides "auto" instead (`env_decides_auto`), so a
    test suite computes the same on every CPU kind.
    """
    precision = env_decides_auto(precision)
    if precision != "auto":
        return precision == "bf16"
    if dev.type == "cuda":
        return True
    capabilities: dict[str, bool] = getattr(torch.cpu, "get_capabilities", dict)()
    if capabilities.get("amx_bf16"):
        return True
    return bool(capabilities.get("avx512_bf16")) and cpu_vendor() == "AuthenticAMD"


def cpu_vendor() -> str:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD, ...) from /proc/cpuinfo; "" where
    there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def autocast(dev: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU or CUDA when `enabled` (see `use_bf16`)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


def torch_threads(configured: int | None = None, sharing: int = 1) -> int:
    """Threads torch should use in a CPU worker: the config's number, else the
    RAYPURIFY_THREADS environment variable, else this machine's cores shared among the
    `sharing` workers of one job. Set RAYPURIFY_THREADS=1 when several jobs share a small
    machine: OpenMP threads that outnumber the cores spin and slow everyone down."""
    if configured:
        return configured
    env = os.environ.get("RAYPURIFY_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // sharing)
