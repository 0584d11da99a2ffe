"""`raypurify ui`: the MLflow UI on the project's store, with a sweep's comparison link."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ui",
        help="serve the MLflow UI (on 127.0.0.1) and print a sweep's comparison link",
        description="Serve the MLflow UI against the project's store (MLFLOW_TRACKING_URI, "
        "else ./mlflow.db; with --sweep, the store the sweep logged to) until Ctrl-C. With "
        "--sweep DIR, also print the link to MLflow's compare-runs page of every trial of "
        "that sweep (kld1, kld2, lambda and the objective side by side).",
    )
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="port to serve on (default 5000, or a free one when 5000 is taken)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1: this machine only)",
    )
    p.add_argument("--sweep", metavar="DIR", help="a sweep's output directory (has sweep.json)")
    p.add_argument(
        "--backend-store-uri",
        metavar="URI",
        help="the MLflow store to serve (overrides MLFLOW_TRACKING_URI and the sweep's)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from raypurify.sweeps.ui import serve

    return serve(
        host=args.host,
        port=args.port,
        sweep_dir=args.sweep,
        backend_store_uri=args.backend_store_uri,
    )
