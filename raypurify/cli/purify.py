"""`raypurify purify`: D-VAE (or plain VAE) purification of a dataset directory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raypurify.cli.common import common_options

if TYPE_CHECKING:
    import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "purify",
        parents=[common_options("stage2.epochs=10")],
        help="purify a (poisoned) dataset with D-VAE: P0 -> P1 -> P2 -> P3",
        description="Two-stage D-VAE purification (Algorithm 1). OUT receives p1/, p2/, p3/ "
        "and summary.json; rerunning with the same input and config resumes, anything else is "
        "refused.",
    )
    p.add_argument("--data", required=True, help="input dataset directory (interchange format)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--preset", default="paper", help="paper, cpu, vae-paper, vae-cpu, ...")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard a purification in OUT made from another input or config (only ever a "
        "raypurify output, never the input)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from raypurify.atomic import check_not_input
    from raypurify.data.interchange import open_dataset
    from raypurify.defenses.dvae.config import preset
    from raypurify.defenses.dvae.pipeline import check_output, purify
    from raypurify.storage import join_cluster

    cfg = preset(args.preset, args.overrides)
    info = open_dataset(args.data)  # a missing or malformed input fails before Ray starts
    check_not_input(args.out, [args.data])
    check_output(Path(args.out).resolve(), cfg, info, args.overwrite)  # another run there
    # On a multi-node cluster, OUT must be a folder every node sees (workers write the
    # stages' checkpoints there) and the runs must go to a tracking server.
    join_cluster(args.out, args.num_cpus)
    summary = purify(args.data, args.out, cfg, overwrite=args.overwrite)
    for name, stage in summary["stages"].items():
        final = stage["final"]
        print(
            f"{name}: {final['epoch']} epoch{'s' * (final['epoch'] != 1)}, kl {final['kl']:.3f}, "
            f"psnr(x_hat) {final['psnr_xhat']:.2f} dB, {stage['train_s']:.0f} s"
        )
    for name, p in summary["passes"].items():
        rate = "reused" if p.get("reused") else f"{p.get('images_per_s', 0):.0f} images/s"
        print(f"pass {name}: {rate}")
    print(f"purified set ({cfg.output.upper()}) -> {summary['output']}")
    return 0
