"""Sweeps, for real: Ray Tune + Optuna + ASHA over a tiny space, tracked in a real MLflow
store, interrupted by Ctrl-C in its first trial and resumed; and bad space files refused
before work."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import new_store, run_and_kill
from ray.util import placement_group_table

from raypurify.cli import main
from raypurify.sweeps.results import spearman
from raypurify.sweeps.space import load_space, overrides_for

TINY = {
    "name": "tiny",
    # Procedural images a small CNN separates in a few epochs, and a weak "attack": sensible
    # trials' classifiers score far above chance at once, so ASHA has a clear loser to stop.
    "dataset": {"name": "synthetic", "rows": 500, "classes": 4, "subset": 400},
    "validation": {"rows": 100, "seed": 1},
    "test": {"name": "synthetic", "split": "test", "rows": 200, "classes": 4},
    "attack": {"name": "random-noise"},
    "purifier": {
        "preset": "cpu",
        "overrides": [
            "model.width=16",
            "model.latent=32",
            "stage2.kld_limit=50.0",  # the first point keeps the images sharp
            "stage1.epochs=4",
            "stage2.epochs=4",
            "stage1.batch_size=32",
            "stage2.batch_size=32",
            "stage1.phat_start_epoch=0",
            "stage2.phat_start_epoch=0",
        ],
    },
    "classifier": {
        "recipe": "cpu",
        "overrides": [
            "epochs=6",
            "arch_options.width=8",
            "batch_size=32",
            "optim.lr=0.4",
            "optim.warmup_epochs=0",
            "optim.label_smoothing=0",
        ],
    },
    "parameters": {
        "kld1": {"low": 0.5, "high": 2.0, "log": True},
        "kld2": {"low": 0.001, "high": 100.0, "log": True},
        "lambda": {"low": 0.001, "high": 1000.0, "log": True},
    },
    "probe_rows": 50,
    # The second point caps stage 2 at a rate of ~0 nats and weighs it heavily: P3 is close
    # to one flat image, its classifier near chance, and ASHA stops it after the preset's.
    "budget": {
        "samples": 2,
        "concurrency": 1,
        "seed": 0,
        "points": [{"kld1": 1.0, "kld2": 0.001, "lambda": 1000.0}],
    },
    # the rung is late in the classifier's 6 epochs: the first point's classifier went from
    # chance (0.25) to 0.79 in its 4th and last epoch when it had 4 (measured)
    "asha": {"grace_period": 5, "reduction_factor": 2},
}


def write_space(path: Path, **changes) -> Path:
    data = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path.write_text(yaml.safe_dump(data))
    return path


def children(uri: str, parent_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def trial_processes() -> list[int]:
    """Pids of this machine's Tune trial processes (Ray titles them `ray::ImplicitFunc`)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes().startswith(b"ray::ImplicitFunc"):
                pids.append(int(d.name))
        except OSError:  # ended meanwhile
            pass
    return pids


class TrialKiller(threading.Thread):
    """SIGKILLs the running trial's process once, as soon as a classifier has written a
    Ray Train checkpoint into `store` after this started: a lost process mid-trial."""

    def __init__(self, store: Path):
        super().__init__(daemon=True)
        self.store, self.since = store, time.time()
        self.killed: list[int] = []
        self.stop = threading.Event()

    def fresh(self) -> list[Path]:
        """Classifier checkpoints written since this started. The store's writers rename
        temporary folders away while the walk goes on: a walk that trips on one (its
        FileNotFoundError once ended this thread silently, and no trial was killed) is
        taken again at the next poll."""
        try:
            return [
                p
                for p in self.store.glob("**/checkpoints/train/checkpoint_*/state.pt")
                if p.stat().st_mtime > self.since
            ]
        except FileNotFoundError:
            return []

    def run(self) -> None:
        while not self.stop.wait(0.2):
            fresh = self.fresh()
            pids = trial_processes()
            if fresh and pids:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                self.killed = pids
                return


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mlflow_template, ray_session):
    """A 2-trial sweep interrupted by Ctrl-C (with its own Ray) while its first trial
    purifies, then resumed in this process to the full count, the running trial's process
    killed once on the way (Tune restarts it). ASHA's rungs are not restored with a sweep,
    so both trials run after the resume, where the second can be stopped against the first."""
    root = tmp_path_factory.mktemp("sweep")
    uri = new_store(mlflow_template, root)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        space_file = write_space(root / "tiny.yaml")
        out = root / "out"
        settings = ["--set", "probe_rows=50"]  # the resume command must carry them

        def first_trial_purifying() -> bool:  # a D-VAE stage checkpointed, its step unfinished
            return any(
                not (p.parents[3] / "step.json").exists()
                for p in out.glob("store/purify/*/purify/checkpoints/*/checkpoint_*")
            )

        args = ["-m", "raypurify", "sweep", str(space_file), "--out", str(out), *settings]
        code, output = run_and_kill(args, first_trial_purifying, timeout=900, sig=signal.SIGINT)
        interrupted = {"code": code, "output": output, "rows": trials(out)}
        parent = json.loads((out / "sweep.json").read_text())["parent_run_id"]
        interrupted["tags"] = [r.data.tags for r in children(uri, parent)]
        killer = TrialKiller(out / "store")
        killer.start()
        before = set(placement_group_table())
        try:
            assert main(["sweep", str(space_file), "--out", str(out), *settings, "--resume"]) == 0
        finally:
            killer.stop.set()
        reserved = [
            left(group, info["bundles"])
            for group, info in placement_group_table().items()
            if group not in before and info["state"] != "REMOVED"
        ]
        yield {
            "out": out,
            "uri": uri,
            "space_file": space_file,
            "space": load_space(str(space_file)),
            "interrupted": interrupted,
            "trial_killed": killer.killed,
            "reserved": reserved,
        }
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def left(group: str, bundles: dict) -> dict:
    """A group left reserved, with what tells whose it is: what it holds (Tune's trial
    groups hold memory, Train's CPUs) and the actor that made it (class, state, pid)."""
    from ray._private.state import state

    from raypurify.ray_private import placement_group_records

    record = next((g for g in placement_group_records() if g.group_id == group), None)
    creator = record and record.creator_actor and state.actor_table(record.creator_actor)
    return {
        "group": group,
        "bundles": bundles,
        "creator": creator
        and {k: creator.get(k) for k in ("ActorClassName", "State", "Pid", "DeathCause")},
        "creator_dead": record and record.creator_dead,
    }


def trials(out: Path) -> list[dict]:
    with (out / "trials.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_ctrl_c_names_the_resume_command_and_no_trial_stopped_by_asha(sweep):
    """Ctrl-C while a trial runs: exit 130 with the resume command (settings included: a
    sweep resumed with others is refused), and the running trial INTERRUPTED (Tune ends it
    as TERMINATED in memory, which must not read as ASHA)."""
    interrupted = sweep["interrupted"]
    assert interrupted["code"] == 130, interrupted["output"][-3000:]
    resume = f"raypurify sweep {sweep['space_file']} --out {sweep['out']} --set probe_rows=50"
    assert f"{resume} --resume" in interrupted["output"]
    statuses = [r["status"] for r in interrupted["rows"]]
    assert "INTERRUPTED" in statuses, interrupted["rows"]
    assert "STOPPED" not in statuses, interrupted["rows"]
    assert all("asha_stopped_at_epoch" not in tags for tags in interrupted["tags"])


def test_a_sweep_prints_its_own_table_and_not_tunes_or_optunas(sweep):
    """Tune's box, its TensorBoard hint (a folder under /tmp), its INFO lines and its own
    resume hint (a Python call), and Optuna's INFO lines, stay off the terminal; our
    progress and resume line do not."""
    output = sweep["interrupted"]["output"]
    assert "preparing data/clean" in output and "--resume" in output
    noises = ("Configuration for experiment", "tensorboard", "INFO tune.py", "[I 20", "Tuner.")
    for noise in noises:
        assert noise not in output, noise


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_to_every_output(sweep):
    out = sweep["out"]
    rows = trials(out)
    assert len(rows) == 2
    assert {
        "trial_id",
        "status",
        "kld1",
        "kld2",
        "lambda",
        "objective",
        "test_accuracy",
        "wall_s",
        "stopped_by_asha",
    } <= set(rows[0])
    for name in (
        "best.json",
        "results.md",
        "summary.json",
        "optuna.journal",
        "sweep.json",
        "parallel_coordinates.png",
        "param_importance.png",
        "objective_by_trial.png",
    ):
        assert (out / name).stat().st_size > 0, name
    best = json.loads((out / "best.json").read_text())
    done = [r for r in rows if r["status"] == "DONE"]
    assert best["objective"] == pytest.approx(max(float(r["objective"]) for r in done))
    assert set(best["config"]) == {"kld1", "kld2", "lambda"}
    assert "| best |" in (out / "results.md").read_text()
    # Where the trials' Ray steps spent their time, as a table's report says it.
    split = json.loads((out / "summary.json").read_text())["time_split"]
    assert {"purify", "train"} <= set(split)
    for kind in ("purify", "train"):
        assert split[kind]["steps"] >= 1
        assert 0 < split[kind]["work_s"] < split[kind]["wall_s"]
    assert "Where the steps' time went" in (out / "results.md").read_text()
    # two trials give no rank correlation: the report says why instead of printing "-"
    assert "need three finished trials (" in (out / "results.md").read_text()


@pytest.mark.slow
def test_a_trial_whose_process_died_is_restarted_and_finishes(sweep):
    assert sweep["trial_killed"], "no trial was running a classifier after the resume"
    rows = trials(sweep["out"])
    restarted = [r for r in rows if int(r["restarts"]) >= 1]
    assert len(restarted) == 1, rows
    assert restarted[0]["status"] in ("DONE", "STOPPED"), restarted[0]
    summary = json.loads((sweep["out"] / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["errors"] == 0


@pytest.mark.slow
def test_no_cpu_stays_reserved_by_a_stopped_or_killed_trial(sweep):
    """ASHA's stop and the killed trial process end their Ray Train runs' controllers; the
    runs' placement groups must not keep their CPUs (later trials would wait forever)."""
    assert sweep["trial_killed"] and trials(sweep["out"])
    assert sweep["reserved"] == [], sweep["reserved"]  # in full: whose group, in what state


@pytest.mark.slow
def test_the_trials_train_on_the_sweeps_warm_group(sweep):
    """On this local Ray, the trials' D-VAE stages and classifiers are jobs of the warm
    group the driver opened for them (one: one trial at a time), killed and stopped trials
    included (the ASHA test shows the classifier's epochs still reach Tune): their
    checkpoints are written by the group's jobs, not by Ray Train runs of their own."""
    out = sweep["out"]
    assert sorted(d.name for d in (out / ".warm-groups").iterdir()) == ["warm-group"]
    fits = {p.parents[1] for p in out.glob("store/*/*/*/checkpoints/*/checkpoint_*/state.pt")}
    assert {f.name for f in fits} == {"stage1", "stage2", "train"}
    assert not [f for f in fits if (f / "checkpoint_manager_snapshot.json").exists()]


@pytest.mark.slow
def test_every_suggestion_lies_inside_the_space(sweep):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    space = sweep["space"]
    for row in trials(sweep["out"]):
        for name, rng in space.parameters.items():
            assert rng.low <= float(row[name]) <= rng.high, (name, row[name])
    state = json.loads((sweep["out"] / "sweep.json").read_text())
    storage = JournalStorage(JournalFileBackend(str(sweep["out"] / "optuna.journal")))
    study = optuna.load_study(study_name=state["study_name"], storage=storage)
    assert len(study.trials) >= 2
    first = study.trials[0].params  # the preset's values come first
    assert first == pytest.approx({"kld1": 1.0, "kld2": 50.0, "lambda": 0.01})


def test_optunas_suggestions_after_the_points_lie_inside_the_space():
    """The sweep above runs its two given points only; what TPE suggests after them is
    checked here, on the same searcher the sweep builds, without running trials."""
    from ray.tune.search.optuna import OptunaSearch

    from raypurify.sweeps.search import distributions

    space = load_space("cpu")
    searcher = OptunaSearch(space=distributions(space), metric="objective", mode="max")
    for i in range(8):
        suggested = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"objective": float(i % 3)})
        for name, rng in space.parameters.items():
            assert rng.low <= suggested[name] <= rng.high, (name, suggested)


@pytest.mark.slow
def test_asha_stops_a_trial_and_the_sweep_still_finishes(sweep):
    rows = trials(sweep["out"])
    stopped = [r for r in rows if r["stopped_by_asha"] == "True"]
    assert stopped, rows
    assert all(int(r["epoch"]) < 6 for r in stopped)
    assert any(float(r["kld2"]) == pytest.approx(0.001) for r in stopped)  # the flat one
    assert sum(r["status"] == "DONE" for r in rows) >= 1
    # The time split counts finished steps; the report says whose classifiers it leaves out.
    report = (sweep["out"] / "results.md").read_text()
    assert f"the classifiers ASHA stopped ({len(stopped)}) are not in it" in report


@pytest.mark.slow
def test_mlflow_has_one_child_per_trial_with_its_params(sweep):
    state = json.loads((sweep["out"] / "sweep.json").read_text())
    kids = children(sweep["uri"], state["parent_run_id"])
    runs = [r for r in kids if "trial_id" in r.data.tags]
    rows = {r["trial_id"]: r for r in trials(sweep["out"])}
    assert len(runs) == len(rows) == 2  # no duplicate after the resume
    shared = {r.info.run_name for r in kids if "trial_id" not in r.data.tags}
    assert "poison/random-noise" in shared  # the shared steps' runs are kept
    for run in runs:
        row = rows[run.data.tags["trial_id"]]
        for name in ("kld1", "kld2", "lambda"):
            assert float(run.data.params[name]) == pytest.approx(float(row[name]))
        if row["status"] in ("DONE", "STOPPED"):  # an ERROR trial may fail before any epoch
            assert "val_accuracy" in run.data.metrics
        if row["status"] == "DONE":
            assert run.data.metrics["objective"] == pytest.approx(float(row["objective"]))
            assert run.info.status == "FINISHED"
            # its classifier's own run, with the per-epoch curves, as a table cell has (a
            # restarted trial's killed attempt left one more, closed as KILLED)
            steps = children(sweep["uri"], run.info.run_id)
            train = [s for s in steps if s.info.run_name.startswith("train/")]
            finished = [s for s in train if s.info.status == "FINISHED"]
            assert len(finished) == 1 and "train_loss" in finished[0].data.metrics, train
        # nothing under a trial is left RUNNING (ASHA, the kills, the restart)
        assert all(s.info.status != "RUNNING" for s in children(sweep["uri"], run.info.run_id))


@pytest.mark.slow
def test_the_best_purified_set_is_a_step_run_reuses(sweep):
    """An experiment with the same data, attack and the best overrides finds the sweep's
    clean data, poison and purification finished in the sweep's store."""
    from raypurify.experiments.runner import finished_steps
    from raypurify.experiments.spec import ExperimentSpec

    space = sweep["space"]
    best = json.loads((sweep["out"] / "best.json").read_text())
    spec = ExperimentSpec.model_validate(
        {
            "name": "reuse",
            "dataset": space.dataset.to_dict(),
            "test": space.test.to_dict(),
            "attacks": [{"name": "random-noise"}],
            "defenses": [{"name": "dvae", "options": best["purifier"]}],
            "clean_row": False,
        }
    )
    found = {s.name for s in finished_steps(spec, sweep["out"])}
    assert {"data/clean", "poison/random-noise", "purify/random-noise/dvae"} <= found
    assert best["purify_key"] in {
        s.key for s in finished_steps(spec, sweep["out"]) if s.kind == "purify"
    }


@pytest.mark.slow
def test_a_moved_sweep_reruns_to_its_results_from_where_it_is(sweep, tmp_path):
    """A finished sweep copied elsewhere: the same command on the copy rebuilds its
    outputs from its own trials and store, and never touches (or recreates) the place it
    was written."""
    out = sweep["out"]
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    for name in ("results.md", "best.json", "trials.csv"):
        (moved / name).unlink()
    away = out.with_name(out.name + "-away")
    out.rename(away)
    try:
        args = ["sweep", str(sweep["space_file"]), "--out", str(moved), "--set", "probe_rows=50"]
        assert main(args) == 0
        assert not out.exists()
        assert trials(moved) == trials(away)
        best, before = (json.loads((d / "best.json").read_text()) for d in (moved, away))
        assert best.pop("store") == str(moved / "store")  # where its best purification is now
        before.pop("store")
        assert best == before
    finally:
        away.rename(out)


def test_a_sweep_that_ran_to_the_end_opens_no_group_when_rerun(tmp_path):
    """A rerun of a finished sweep only rebuilds its outputs: no trial runs, so no warm
    group is started for one (a group's start is seconds on 2 cores). One that was
    interrupted, or has failed trials (a resume reruns them), or wrote no summary does."""
    from raypurify.sweeps.results import SUMMARY, ran_to_the_end

    assert not ran_to_the_end(tmp_path)
    for summary, ended in [
        ({"interrupted": 0, "errors": 0}, True),
        ({"interrupted": 1, "errors": 0}, False),
        ({"interrupted": 0, "errors": 2}, False),
        ({}, False),
    ]:
        (tmp_path / SUMMARY).write_text(json.dumps(summary))
        assert ran_to_the_end(tmp_path) is ended, summary
    (tmp_path / SUMMARY).write_text("{not json")
    assert not ran_to_the_end(tmp_path)


BAD = [
    ({"parameters.width2": {"low": 1, "high": 2}}, "parameters.width2"),
    ({"parameters.kld1": {"low": 2.0, "high": 2.0}}, "parameters.kld1"),
    ({"parameters.kld1": {"low": 3.0, "high": 1.0}}, "parameters.kld1"),
    ({"parameters.lambda": {"low": 0.0, "high": 1.0, "log": True}}, "parameters.lambda"),
    ({"parameters.kld2": None}, "parameters.kld2"),
    ({"objective": "test_accuracy"}, "objective"),
    ({"attack.name": "emm"}, "attack"),
    ({"purifier.preset": "nope"}, "purifier: preset"),
    ({"classifier.recipe": "nope"}, "classifier: recipe"),
    ({"test.name": "nope"}, "test.name"),
    ({"budget.concurrency": 64}, "budget.concurrency"),
    ({"budget.samples": 0}, "budget.samples"),
    ({"asha.grace_period": 6}, "asha.grace_period"),
    ({"dataset.subset": None}, "dataset.subset"),
    (
        {"attack.released": {"format": "perturbation", "paths": ["nope.npy"]}},
        "attack.released.paths.0",
    ),
    ({"attack.released": {"format": "nope", "paths": ["bad.yaml"]}}, "attack.released"),
    ({"budget.points": [{"kld1": 1.0}]}, "budget.points"),
]


@pytest.mark.parametrize(("change", "names"), BAD, ids=[b[1] for b in BAD])
def test_a_bad_space_fails_before_any_work(tmp_path, capsys, ray_session, change, names):
    space_file = write_space(tmp_path / "bad.yaml", **change)
    out = tmp_path / "out"
    assert main(["sweep", str(space_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and names in err and "\n" not in err, err
    assert not out.exists()


def test_a_space_name_or_file_is_required(capsys):
    assert main(["sweep", "no-such-space", "--out", "x"]) == 2
    assert "shipped space" in capsys.readouterr().err


def test_the_resume_command_repeats_every_setting_of_the_sweep():
    """A sweep resumed with other settings is refused, so the command printed on Ctrl-C must
    carry each of them, quoted for the shell."""
    from raypurify.cli import build_parser
    from raypurify.cli.sweep import resume_command

    argv = ["sweep", "my space.yaml", "--out", "o", "--set", "seed=3", "--samples", "4"]
    argv += ["--concurrency", "2", "--num-cpus", "3"]
    args = build_parser().parse_args(argv)
    assert resume_command(args) == (
        "raypurify sweep 'my space.yaml' --out o --set seed=3 --samples 4 --concurrency 2 "
        "--num-cpus 3 --resume"
    )


def test_a_released_poison_is_imported_from_beside_the_space_file_into_the_tables_step(
    tmp_path, monkeypatch, mlflow_uri
):
    """A space may name a released poison, as a table's row does, by a path relative to the
    space file; the sweep imports it (from any working directory) into the same store step
    a table with that row would use."""
    import numpy as np

    from raypurify.data.interchange import read_images
    from raypurify.experiments.runner import finished_steps
    from raypurify.experiments.spec import ExperimentSpec
    from raypurify.experiments.store import Store
    from raypurify.sweeps.driver import prepare, prepare_steps
    from raypurify.tracking import start_run

    patterns = np.random.default_rng(0).integers(-8, 9, size=(4, 3, 32, 32)).astype(np.int16)
    (tmp_path / "poisons").mkdir()
    np.save(tmp_path / "poisons" / "noise.npy", patterns)
    released = {
        "format": "perturbation",
        "paths": ["../poisons/noise.npy"],
        "options": {"granularity": "class", "units": "pixel"},
    }
    attack = {"name": "random-noise", "label": "noise", "released": released}
    (tmp_path / "spaces").mkdir()
    space_file = write_space(tmp_path / "spaces" / "s.yaml", attack=attack)
    monkeypatch.chdir(tmp_path / "spaces")
    space = load_space(str(space_file))
    monkeypatch.chdir("/")
    out = tmp_path / "out"
    prepared = prepare(Store(out / "store"), start_run("sweep", "prepare"), prepare_steps(space))

    poisoned, clean = (read_images(prepared[k].result["path"]) for k in ("poison", "clean"))
    delta = poisoned.images.astype(int) - clean.images.astype(int)
    assert prepared["poison"].name == "poison/noise"
    # each row carries its class's pattern (HWC), clipped where the image saturates
    unclipped = (clean.images >= 8) & (clean.images <= 247)
    expected = patterns.transpose(0, 2, 3, 1)[clean.labels]
    assert np.array_equal(delta[unclipped], expected[unclipped])
    table = ExperimentSpec.model_validate(
        {
            "name": "t",
            "dataset": space.dataset.to_dict(),
            "test": space.test.to_dict(),
            "attacks": [attack],
            "defenses": [{"name": "none"}],
            "clean_row": False,
        }
    ).with_paths_from(tmp_path / "spaces")
    found = {s.name: s.key for s in finished_steps(table, out) if s.kind == "poison"}
    assert found == {"poison/noise": prepared["poison"].key}


def test_a_space_that_names_no_new_attack_field_keeps_its_digest():
    """The attack dumps as it did before sweeps took a table's row (name and options), so
    a sweep started then still resumes; a label, once given, is part of it."""
    from raypurify.sweeps.space import SweepSpace

    space = SweepSpace.model_validate(TINY)
    assert space.attack.to_dict() == {"name": "random-noise", "options": {}}
    labelled = SweepSpace.model_validate({**TINY, "attack": {"name": "random-noise", "label": "n"}})
    assert labelled.digest() != space.digest()


def test_the_shipped_spaces_validate():
    for name in ("demo", "cpu", "cifar10-paper", "cifar100-paper"):
        space = load_space(name, datasets=False)  # CIFAR-100 is not offline here
        assert {"kld1", "kld2", "lambda"} <= set(space.parameters)


def test_parameters_map_to_their_config_paths():
    assert overrides_for({"kld1": 0.5, "lambda": 0.02, "width": 16.0}) == [
        "stage1.kld_limit=0.5",
        "stage1.kl_weight=0.02",
        "stage2.kl_weight=0.02",
        "model.width=16",
    ]


def test_spearman_ranks():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None


def test_the_linear_probe_finds_a_shortcut_and_not_noise():
    """The label-free score's linear part: near-perfect on class-wise patterns, chance on
    images whose labels carry no pixel signal."""
    import numpy as np

    from raypurify.data.imageset import ImageSet
    from raypurify.sweeps.trial import linear_probe_accuracy

    rng = np.random.default_rng(0)
    labels = np.arange(600) % 10
    noise = rng.integers(0, 256, (600, 8, 8, 3)).astype(np.uint8)
    patterns = rng.integers(-20, 21, (10, 8, 8, 3))
    shortcut = np.clip(noise.astype(int) // 2 + 64 + patterns[labels], 0, 255).astype(np.uint8)
    names = [str(c) for c in range(10)]

    def acc(images):
        data = ImageSet(images, labels, np.arange(600), names)
        return linear_probe_accuracy(data.take(np.arange(500)), data.take(np.arange(500, 600)), 0)

    assert acc(shortcut) > 0.9
    assert acc(noise) < 0.3


def test_trials_share_groups_sized_for_a_purification_only_on_a_local_ray_on_cpus(
    tmp_path, monkeypatch
):
    """The driver decides for its trials (a trial's process may not know it runs on a
    cluster): groups on a local Ray on CPUs, none on a cluster, on a GPU, or when off; of
    the purification's workers, the step a trial starts with."""
    from raypurify.sweeps.groups import group_size

    def space(classifier_device: str, purify_workers: int = 1):
        purifier = [*TINY["purifier"]["overrides"], "device=cpu", f"workers={purify_workers}"]
        classifier = [*TINY["classifier"]["overrides"], f"device={classifier_device}"]
        changes = {"purifier.overrides": purifier, "classifier.overrides": classifier}
        name = f"{classifier_device}-{purify_workers}.yaml"
        return load_space(str(write_space(tmp_path / name, **changes)))

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAYPURIFY_WARM_GROUP", raising=False)
    assert group_size(space("cpu")) == 1
    assert group_size(space("cpu", purify_workers=2)) == 2
    assert group_size(space("cuda")) is None
    monkeypatch.setenv("RAYPURIFY_WARM_GROUP", "0")
    assert group_size(space("cpu")) is None
    monkeypatch.setenv("RAYPURIFY_WARM_GROUP", "1")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert group_size(space("cpu")) is None


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))


def test_a_sweep_does_not_resume_on_a_dataset_or_released_poison_changed_in_place(tmp_path):
    """The space names its dataset and released poison by path (its digest stays when the
    files change); the record's inputs name their content, so a resume on other data is
    refused, naming what changed, instead of mixing two sweeps' trials."""
    import numpy as np

    from raypurify.data.imageset import ImageSet
    from raypurify.data.interchange import write_images
    from raypurify.errors import ConfigError
    from raypurify.sweeps.driver import STATE, load_state, prepare_steps, sweep_inputs
    from raypurify.sweeps.space import SweepSpace

    def write_data(seed: int) -> None:
        pixels = np.random.default_rng(seed).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
        data = ImageSet(pixels, np.arange(40) % 4, np.arange(40), list("abcd"))
        write_images(data, tmp_path / "data", overwrite=True)

    def write_poison(seed: int) -> None:
        rng = np.random.default_rng(seed)
        np.save(tmp_path / "noise.npy", rng.integers(-8, 9, (4, 3, 32, 32)).astype(np.int16))

    write_data(0)
    write_poison(0)
    released = {"format": "perturbation", "paths": [str(tmp_path / "noise.npy")]}
    space = SweepSpace.model_validate(
        {
            **TINY,
            "dataset": {"name": "parquet", "path": str(tmp_path / "data"), "subset": 20},
            "attack": {"name": "random-noise", "released": released},
        }
    )
    out = tmp_path / "out"
    out.mkdir()

    def inputs() -> dict[str, str]:  # read anew each time: the files change below
        return sweep_inputs(space, prepare_steps(space))

    state = {"space": space.name, "space_digest": space.digest(), "inputs": inputs()}
    (out / STATE).write_text(json.dumps(state))
    assert load_state(out, space, inputs()) == state  # unchanged: resumes

    write_poison(1)
    with pytest.raises(ConfigError, match=r"sweep's poison/random-noise changed") as e:
        load_state(out, space, inputs())
    assert "data/clean" not in str(e.value)
    write_poison(0)
    write_data(1)
    with pytest.raises(ConfigError, match=r"sweep's data/clean, data/validation changed"):
        load_state(out, space, inputs())
    (out / STATE).write_text(json.dumps(state | {"inputs": None}))  # before `inputs`
    assert load_state(out, space, inputs())["space"] == space.name
