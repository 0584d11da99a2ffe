"""`raypurify run`, `raypurify report`, `raypurify presets`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from raypurify.cli.common import common_options, gist

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

    from raypurify.experiments.spec import ExperimentSpec


def register(sub: argparse._SubParsersAction) -> None:
    common = common_options("seed=1")
    p = sub.add_parser(
        "run",
        parents=[common],
        help="run a whole attack x defence experiment (a preset or a YAML)",
        description="Run an experiment; OUT receives results.csv, results.md, plots and the "
        "step store. Rerunning with the same OUT skips finished steps and resumes the rest.",
    )
    p.add_argument("spec", help="a preset name (see `raypurify presets`) or a YAML file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--force",
        action="append",
        default=[],
        metavar="STEP",
        help="re-run steps whose name matches (glob, e.g. 'train/lsp/*')",
    )
    p.set_defaults(run=run)

    r = sub.add_parser(
        "report",
        parents=[common],
        help="rebuild an experiment's table and plots",
        description="Rebuild DIR's table and plots from its last run. With --spec, tabulate "
        "whatever steps of that spec are finished in DIR's store (blank cells for the rest), "
        "without running anything: a partial table while a long run goes on.",
    )
    r.add_argument("dir", help="an experiment output directory")
    r.add_argument("--spec", help="a preset name or YAML whose finished cells to tabulate")
    r.set_defaults(run=run_report)

    ls = sub.add_parser("presets", help="list the shipped experiment presets")
    ls.set_defaults(run=run_presets)


def load(name_or_path: str, overrides: Sequence[str]) -> ExperimentSpec:
    """The spec, with an unreadable YAML file (binary, not UTF-8) as one line too."""
    from raypurify.errors import ConfigError
    from raypurify.experiments import load_spec

    path = Path(name_or_path)
    if path.is_file():
        try:
            path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            detail = e.reason if isinstance(e, UnicodeDecodeError) else e.strerror
            raise ConfigError(f"{path}: not a readable UTF-8 YAML file ({detail})") from None
    return load_spec(name_or_path, overrides)


def run(args: argparse.Namespace) -> int:
    from raypurify.experiments.runner import run_experiment
    from raypurify.reports.experiment import REPORT_FILES

    spec = load(args.spec, args.overrides)
    results = run_experiment(spec, args.out, force=args.force, num_cpus=args.num_cpus)
    print((Path(args.out) / "results.md").read_text())
    steps = results["steps"]
    print(f"{steps['ran']} steps run, {steps['reused']} reused from earlier runs")
    made = [f for f in REPORT_FILES if (Path(args.out) / f).exists()]
    print(f"results -> {args.out}/" + ", ".join(made))
    return 0


def run_report(args: argparse.Namespace) -> int:
    from raypurify.reports import experiment

    out = Path(args.dir)
    if args.spec:
        from raypurify.errors import RaypurifyError
        from raypurify.experiments.runner import finished_steps

        if not (out / "store").is_dir():
            raise RaypurifyError(f"{out}: no store/; is this an experiment output directory?")
        spec = load(args.spec, args.overrides)
        experiment.save_run(out, spec, [str(s.dir) for s in finished_steps(spec, out)])
    spec, records = experiment.load_run(out)
    results = experiment.collect(spec, records)
    experiment.write(spec, results, out, records)
    print(experiment.markdown(spec, results))
    return 0


def run_presets(args: argparse.Namespace) -> int:
    from raypurify.experiments import load_spec, presets

    for name in presets():
        spec = load_spec(name)
        print(f"{name:<20} {gist(spec.description)}")
    return 0
