"""The private Ray names raypurify relies on (raypurify/ray_private.py): if a Ray upgrade
moves or renames one, these fail here, by name, instead of the behaviour going quietly."""

from __future__ import annotations

import importlib
import subprocess
import sys

from raypurify.ray_private import REPORT_LOGGER_MODULE, report_logger


def test_ray_train_logs_its_reports_to_the_logger_the_workers_quiet():
    module = importlib.import_module(REPORT_LOGGER_MODULE)
    assert module.logger is report_logger()


def test_turning_clustering_off_keeps_a_local_ray_on_loopback():
    """In a fresh process (the constant is read at import): after `disable_clustering`,
    Ray resolves this node's address to 127.0.0.1, not the machine's outward IP."""
    code = (
        "import ray._private.services as s\n"
        "from raypurify.ray_private import disable_clustering\n"
        "disable_clustering()\n"
        "print(s.get_node_ip_address())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "127.0.0.1"
