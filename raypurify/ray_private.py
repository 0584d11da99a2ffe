"""The two private Ray names raypurify relies on, kept here and nowhere else.

Ray has no public switch for either. tests/test_ray_private.py fails as soon as a Ray
upgrade moves or renames one, instead of every worker logging each report or a local Ray
listening on every interface.
"""

from __future__ import annotations

import importlib.util
import logging

# Ray Train logs every report, metrics included, at INFO under a logger named by the file
# path of this private module, which RunConfig's log level does not reach.
REPORT_LOGGER_MODULE = "ray.train.v2._internal.execution.context"


def report_logger() -> logging.Logger:
    """The logger Ray Train writes each report to (found without importing private code)."""
    spec = importlib.util.find_spec(REPORT_LOGGER_MODULE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"Ray Train moved {REPORT_LOGGER_MODULE}: update REPORT_LOGGER_MODULE")
    return logging.getLogger(spec.origin)


def disable_clustering() -> None:
    """Keep a local Ray's node address at loopback (runtime.loopback_only says why): the
    constant Ray read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it was imported."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        raise RuntimeError("Ray moved ray_constants.ENABLE_RAY_CLUSTER: update ray_private.py")
    ray_constants.ENABLE_RAY_CLUSTER = False
