"""The demo preset end to end (real Ray, real MLflow store): every cell, resume, kill."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import new_store, run_and_kill
from mlflow.tracking import MlflowClient

from raypurify.cli import main
from raypurify.errors import ConfigError, DatasetError, RaypurifyError
from raypurify.experiments import load_spec
from raypurify.experiments.runner import run_experiment

TINY = [
    "dataset.subset=200",
    # The table crafts its poison here (the demo imports one crafted the same way), so EM
    # runs as a job of the warm group like the other fits.
    "attacks=[{name: em, label: em-class, options: {granularity: class, surrogate: fast-resnet,"
    " surrogate_options: {width: 8}, batch_size: 128, portion: 0.5, max_rounds: 2}}]",
    "test.subset=100",
    "defenses.2.options.overrides=[model.width=8, model.latent=16, stage1.epochs=1, "
    "stage2.epochs=1, stage1.batch_size=32, stage2.batch_size=32]",
    "classifiers.0.overrides=[epochs=2, arch_options.width=8, batch_size=32]",
    # Two steps at once, as the demo runs on the 2-core machines it is for: each fit runs
    # on a free one of two warm worker groups (worker_group.py), the path a user's demo takes.
    "max_parallel=2",
    # The whole clean row (the demo trains only its no-defence cell): a purification of
    # clean data is a path these tests cover.
    "clean_row=true",
    # The paper's Table 1 as a column: clean images + the stage-1 p_hat, on both rows (the
    # clean row's is the control).
    "analyses=[disentangle]",
]
ROWS, COLUMNS = ["clean", "em-class"], ["none", "jpeg", "dvae", "clean+p_hat"]


def table(out: Path) -> dict[tuple[str, str], float]:
    with open(out / "results.csv") as f:
        return {(r["row"], r["column"]): float(r["accuracy"]) for r in csv.DictReader(f)}


def records(out: Path) -> dict[str, int]:
    """Each finished step's record file and its modification time."""
    return {str(p): p.stat().st_mtime_ns for p in (out / "store").glob("*/*/step.json")}


@pytest.fixture(scope="module")
def demo(ray_session, mlflow_template, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    env = pytest.MonkeyPatch()
    env.setenv("MLFLOW_TRACKING_URI", new_store(mlflow_template, root))
    out = root / "out"
    results = run_experiment(load_spec("demo", TINY), out)
    yield out, results
    env.undo()


def test_every_cell_is_in_the_table_and_the_plots_exist(demo):
    out, results = demo
    cells = table(out)
    assert set(cells) == {(r, c) for r in ROWS for c in COLUMNS}
    assert all(0.0 <= a <= 1.0 for a in cells.values())
    md = (out / "results.md").read_text()
    for name in ROWS + COLUMNS:
        assert name in md
    for png in ("accuracy.png", "images.png"):
        assert (out / png).stat().st_size > 1000
    assert results["budgets"]["em-class"]["linf_255"] <= 8.0 + 1e-6
    assert all(0.0 <= c["train_accuracy"] <= 1.0 for c in results["cells"])
    assert "Generalisation gap, classifier `fast-resnet`" in md


def test_the_trace_covers_every_defence_output_of_every_row(demo):
    out, results = demo
    found = {(e["row"], e["output"]): e for e in results["trace"]}
    outputs = ["jpeg", "dvae P1", "dvae P2", "dvae P3"]
    assert set(found) == {(r, o) for r in ROWS for o in outputs}
    assert all(found[("clean", o)]["kept"] is None for o in outputs)
    assert all(np.isfinite(found[("em-class", o)]["kept"]) for o in outputs)
    assert all(5.0 < e["psnr"] < 60.0 for e in found.values())
    assert all(0.0 <= found[("em-class", o)]["high_share"] <= 1.0 for o in outputs)
    assert all(np.isfinite(found[("em-class", o)]["kept_high"]) for o in outputs)
    md = (out / "results.md").read_text()
    assert "Purification trace" in md and "By spatial frequency" in md


def test_steps_at_once_train_on_warm_groups_of_their_own(demo):
    """Every fit ran as a job of one of the two groups (its checkpoints written by the
    hosted job, not by a run of its own), and some of those steps ran at the same time:
    with one group, the second of two fits at once would have started its own run."""
    out, results = demo
    assert len(results["warm_groups_start_s"]) == 2  # their start, reported apart
    assert all(s > 0 for s in results["warm_groups_start_s"])
    assert "Warm worker groups: 2, each up" in (out / "results.md").read_text()
    assert sorted(p.name for p in (out / ".warm-group").iterdir()) == [
        "warm-group-0",
        "warm-group-1",
    ]
    runs = list(out.glob("store/train/*/train/checkpoints/train"))
    runs += list(out.glob("store/purify/*/purify/checkpoints/stage*"))
    assert len(runs) == len(ROWS) * len(COLUMNS) + 2 * len(ROWS)
    for run in runs:
        assert list(run.glob("checkpoint_*/state.pt"))
        assert not (run / "checkpoint_manager_snapshot.json").exists()
    spans = []  # (start, end) of each step that trained, from its record
    for path in out.glob("store/*/*/step.json"):
        record = json.loads(path.read_text())
        if record["kind"] in ("train", "purify"):
            end = path.stat().st_mtime
            spans.append((end - record["seconds"], end))
    spans.sort()
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))


def test_the_report_says_how_much_of_each_kind_of_step_was_work(demo):
    out, results = demo
    split = results["time_split"]
    assert split["train"]["steps"] == len(ROWS) * len(COLUMNS)
    assert split["purify"]["steps"] == len(ROWS)  # D-VAE on each row
    for kind in ("train", "purify"):
        assert 0 < split[kind]["work_s"] < split[kind]["wall_s"]
    assert "Where the steps' time went" in (out / "results.md").read_text()


def test_each_cell_is_an_mlflow_child_run_of_the_experiment(demo):
    client = MlflowClient()
    exp = client.get_experiment_by_name("demo")
    parents = client.search_runs([exp.experiment_id], "tags.kind = 'experiment'")
    assert len(parents) == 1
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
    )
    cells = {
        (r.data.tags["row"], r.data.tags["column"])
        for r in children
        if r.info.run_name.startswith("train/")
    }
    assert cells == {(r, c) for r in ROWS for c in COLUMNS}
    assert {"results.md", "results.csv", "accuracy.png"} <= {
        a.path for a in client.list_artifacts(parents[0].info.run_id)
    }


def test_rerun_skips_every_finished_step(demo):
    out, results = demo
    before = records(out)
    again = run_experiment(load_spec("demo", TINY), out)
    assert records(out) == before  # nothing recomputed
    assert again["steps"]["ran"] == 0 and again["steps"]["reused"] == results["steps"]["ran"]
    assert table(out) == {(c["row"], c["column"]): c["accuracy"] for c in results["cells"]}
    assert again["cells"] == results["cells"]


def test_a_moved_experiment_reads_and_reports_its_own_steps(demo, tmp_path):
    """Step records and run.json were written with OUT's absolute paths; after `mv`, the
    report (which reads the datasets for the trace and the image figure) and a rerun must
    find every step in the new place, and no path of a record may point at the old one."""
    from raypurify.experiments.store import Store

    out, results = demo
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    away = out.with_name(out.name + "-away")
    out.rename(away)  # the old place is gone, as after `mv`
    try:
        assert main(["report", str(moved)]) == 0
        assert table(moved) == {(c["row"], c["column"]): c["accuracy"] for c in results["cells"]}
        again = run_experiment(load_spec("demo", TINY), moved)
        assert again["steps"]["ran"] == 0 and again["cells"] == results["cells"]
        paths = [
            v
            for r in Store(moved / "store").records()
            for v in json.dumps(r["result"]).split('"')
            if v.startswith("/")
        ]
        assert paths and all(Path(p).is_relative_to(moved) and Path(p).exists() for p in paths)
    finally:
        away.rename(out)


def test_a_rerun_with_nothing_to_run_starts_no_worker_group(demo, monkeypatch):
    """Steps one at a time on a local Ray train in a warm group (worker_group.py); a rerun
    whose steps are all finished only rebuilds the report, and must not start one."""
    import raypurify.worker_group

    def refuse(*args, **kwargs):
        raise AssertionError("a warm worker group was started for a finished run")

    monkeypatch.setattr(raypurify.worker_group, "warm_group", refuse)
    out, results = demo
    again = run_experiment(load_spec("demo", [*TINY, "max_parallel=1"]), out)
    assert again["steps"]["ran"] == 0 and again["cells"] == results["cells"]
    with pytest.raises(AssertionError, match="warm worker group"):  # a step to run: it would
        run_experiment(load_spec("demo", [*TINY, "max_parallel=1", "seed=5"]), out)


def test_cells_measured_on_another_test_set_are_not_reused(demo, tmp_path):
    """A train cell's test set is not in its key (stored keys stay) but in its record: a
    spec with another test set finds the data, poison and purification steps finished and
    no train cell, and a run forgets such a cell before training it again."""
    from raypurify.experiments.runner import finished_steps, resolve
    from raypurify.experiments.steps import Step
    from raypurify.experiments.store import Store

    out, _ = demo
    same = {s.kind for s in finished_steps(load_spec("demo", TINY), out)}
    other = {s.kind for s in finished_steps(load_spec("demo", [*TINY, "test.subset=50"]), out)}
    assert {"data", "poison", "purify", "train"} <= same
    assert {"data", "poison", "purify"} <= other and "train" not in other

    store = Store(tmp_path / "store")
    step = Step("train", "train/x", {"a": 1}, [], lambda *a: {}, reads={"test": {"id": "new"}})
    resolve(step, store)  # locates it
    step.dir.mkdir(parents=True)
    meta = {"row": "r", "column": "c", "classifier": "k"}
    cell = {"kind": "train", "name": "train/x", "meta": meta, "result": {"accuracy": 0.5}}
    store.finish(step.dir, cell | {"reads": {"test": "old"}})
    assert not resolve(step, store) and not step.dir.exists()
    step.dir.mkdir(parents=True)
    store.finish(step.dir, cell)  # written before `reads`
    assert resolve(step, store)


def test_report_with_a_spec_tabulates_finished_cells_without_running_any(demo, tmp_path):
    out, _ = demo
    reference, before = table(out), records(out)
    wider = load_spec("demo", TINY).to_dict()
    wider["defenses"].append({"name": "grayscale"})  # a column nothing has trained yet
    (tmp_path / "wider.yaml").write_text(yaml.safe_dump(wider))
    assert main(["report", str(out), "--spec", str(tmp_path / "wider.yaml")]) == 0
    assert records(out) == before  # nothing ran
    assert table(out) == reference  # every finished cell, none invented
    header = next(
        line for line in (out / "results.md").read_text().splitlines() if "| attack" in line
    )
    columns = [c.strip() for c in header.split("|")[1:-1]]
    assert columns[-2:] == ["grayscale", "clean+p_hat"]  # the analysis after every defence
    assert (
        main(["report", str(out), "--spec", "demo", *(a for o in TINY for a in ("--set", o))]) == 0
    )
    assert table(out) == reference and records(out) == before


def test_killed_run_resumes_to_the_same_table(demo):
    out, _ = demo
    reference = table(out)
    # Re-run the EM row's cells in a separate process, and kill it once one is done again.
    args = ["-m", "raypurify", "run", "demo", "--out", str(out), "--force", "train/em-class/*"]
    for o in TINY:
        args += ["--set", o]
    started = time.time()

    def one_cell_done() -> bool:
        done = (out / "store" / "train").glob("*/step.json")
        return any(p.stat().st_mtime > started for p in done)

    run_and_kill(args, one_cell_done)
    left = list((out / "store" / "train").glob("*/step.json"))
    forced = len(COLUMNS)
    # The clean row was kept, one forced cell was redone, the others were not.
    assert len(reference) - forced + 1 <= len(left) < len(reference)
    run_experiment(load_spec("demo", TINY), out)
    assert table(out) == reference


def test_ctrl_c_stops_a_run_within_its_step(tmp_path):
    """Ctrl-C during a long classifier cell: `raypurify run` says interrupted and exits 130
    without first training the cell to its end (the scheduler no longer waits for the
    steps in flight; the warm group cancels its job and the CLI leaves Ray)."""
    from raypurify.workers import saved_state

    spec = tmp_path / "long.yaml"
    spec.write_text(
        "name: long\n"
        "dataset: {name: synthetic, rows: 400, size: 16, classes: 4}\n"
        "test: {name: synthetic, split: test, rows: 100, size: 16, classes: 4}\n"
        "attacks: [{name: lsp}]\ndefenses: [{name: none}]\nclean_row: false\n"
        "classifiers: [{recipe: cpu, overrides: [epochs=500, arch_options.width=8, "
        "batch_size=32, eval_subset=null]}]\n"
    )
    out = tmp_path / "out"

    def training() -> bool:
        for cell in (out / "store" / "train").glob("*"):
            try:
                state = saved_state(cell / "train" / "checkpoints", "train")
            except Exception:  # a checkpoint still being written
                continue
            if state is not None and state["epoch"] >= 2:
                return True
        return False

    code, output = run_and_kill(
        ["-m", "raypurify", "run", str(spec), "--out", str(out)], training, sig=signal.SIGINT
    )
    lines = [line.rsplit("\r", 1)[-1].strip() for line in output.splitlines()]
    assert code == 130 and any(line.endswith("interrupted") for line in lines), output[-2000:]
    assert not list((out / "store" / "train").glob("*/step.json"))  # the cell did not finish
    (cell,) = (out / "store" / "train").glob("*")
    assert saved_state(cell / "train" / "checkpoints", "train")["epoch"] < 100


@pytest.mark.parametrize(
    "override, key",
    [
        ("attacks.0.name=lsq", "attacks.0.name"),
        ("defenses.1.name=jpg", "defenses.1.name"),
        ("classifiers.0.arch=resnet19", "classifiers.0.arch"),
        ("defenses.2.options.preset=fast", "defenses.2.options"),
        ("attacks.0.options.eps=-1", "attacks.0.options"),
    ],
)
def test_config_errors_are_caught_before_any_work(override, key, tmp_path):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_experiment(load_spec("demo", [*TINY, override]), tmp_path / "out")
    assert not (tmp_path / "out" / "store").exists()


def test_missing_dataset_is_caught_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPURIFY_DATA_DIR", str(tmp_path / "nothing"))
    monkeypatch.setenv("RAYPURIFY_TORCHVISION_ROOT", str(tmp_path / "tv"))
    spec = load_spec("demo", ["dataset.name=cifar100", "test.name=cifar100"])
    with pytest.raises(DatasetError, match="cifar100: not found"):
        run_experiment(spec, tmp_path / "out")
    assert not (tmp_path / "out" / "store").exists()


def test_unknown_keys_in_a_yaml_name_their_path(tmp_path):
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        "name: x\ndataset: {name: cifar10-sample}\ntest: {name: cifar10-sample}\n"
        "attacks: [{name: lsp, ratoi: 0.5}]\ndefenses: [{name: none}]\n"
    )
    with pytest.raises(
        ConfigError, match=r"attacks\.0\.ratoi: unknown key \(did you mean 'ratio'\?\)"
    ):
        load_spec(str(spec))


def test_a_clean_row_of_named_columns_plans_only_those_and_the_table_leaves_the_rest_blank():
    from raypurify.experiments.steps import plan
    from raypurify.reports.experiment import markdown

    spec = load_spec("cifar10-mini", ["clean_row=[none, jpeg-10]"])
    names = {s.name for s in plan(spec)}
    assert {"train/clean/none/fast-resnet", "train/clean/jpeg-10/fast-resnet"} <= names
    assert not any(n.startswith(("purify/clean/", "defend/clean/grayscale")) for n in names)
    assert "purify/ops/d-vae" in names  # attack rows keep every column
    cells = [{"row": "clean", "column": "none", "classifier": "fast-resnet", "accuracy": 0.5}]
    table = markdown(spec, {"cells": cells})
    assert "| clean | 50.00 | - |" in table


def test_the_iss_column_takes_the_better_of_its_columns_per_row_and_only_when_both_are_done():
    """cifar10-mini's ISS is derived, never trained: per row and classifier, the better of
    grayscale and JPEG-10, with the column it chose; a row missing either stays blank."""
    from raypurify.reports.experiment import collect, markdown

    spec = load_spec("cifar10-mini")

    def train(row, column, accuracy):
        meta = {"row": row, "column": column, "classifier": "fast-resnet"}
        result = None if accuracy is None else {"accuracy": accuracy}
        name = f"train/{row}/{column}/fast-resnet"
        return {"name": name, "kind": "train", "meta": meta, "result": result}

    records = [
        train("ops", "grayscale", 0.16),
        train("ops", "jpeg-10", 0.73),
        train("lsp", "grayscale", 0.78),
        train("lsp", "jpeg-10", 0.72),
        train("tap", "jpeg-10", 0.70),  # its grayscale cell is not done yet
        train("ar", "grayscale", None),  # a step that has not finished
    ]
    results = collect(spec, records)
    iss = {c["row"]: c for c in results["cells"] if c["column"] == "iss"}
    assert set(iss) == {"ops", "lsp"}
    assert (iss["ops"]["accuracy"], iss["ops"]["chosen"]) == (0.73, "jpeg-10")
    assert (iss["lsp"]["accuracy"], iss["lsp"]["chosen"]) == (0.78, "grayscale")
    table = markdown(spec, results)
    assert "| ops | - | 73.00 | 16.00 | - | 73.00 | - | - |" in table
    assert "| tap | - | 70.00 | - | - | - | - | - |" in table  # no ISS yet
    assert "better input column per row (lsp: grayscale, ops: jpeg-10)" in table


def test_the_gap_table_shows_training_minus_test_accuracy_and_leaves_older_cells_blank():
    from raypurify.reports.experiment import markdown

    spec = load_spec("demo")

    def cell(row, column, test, fit=None):
        kept = {} if fit is None else {"train_accuracy": fit}
        return {"row": row, "column": column, "classifier": "fast-resnet", "accuracy": test} | kept

    older = [cell("clean", "none", 0.56), cell("em-class", "none", 0.25)]
    assert "Generalisation gap" not in markdown(spec, {"cells": older})
    cells = [
        cell("clean", "none", 0.56, fit=0.66),
        cell("em-class", "none", 0.25, fit=1.0),
        cell("em-class", "jpeg", 0.37),  # trained before the training accuracy was kept
        cell("em-class", "dvae", 0.52, fit=0.61),
    ]
    table = markdown(spec, {"cells": cells})
    assert "| clean | 10.00 | - | - |" in table
    assert "| em-class | 75.00 | - | 9.00 |" in table


def test_a_spec_without_classifiers_reports_its_trace_and_no_chart(tmp_path):
    """Datasets only (the poisons, the defences and their trace): no cells to chart."""
    from raypurify.reports.experiment import write

    spec = load_spec("demo", ["classifiers=[]"])
    files = write(spec, {"cells": [], "trace": []}, tmp_path, [])
    assert [f.name for f in files] == ["results.json", "results.csv", "results.md"]
    assert not (tmp_path / "accuracy.png").exists()
    assert "# demo" in (tmp_path / "results.md").read_text()


def test_the_detection_table_lists_each_scored_attack_by_statistic():
    from raypurify.reports.experiment import detection_markdown

    metric = {"accuracy": 0.9, "precision": 0.8, "recall": 1.0, "f1": 0.889}
    lines = detection_markdown(
        [{"row": "ops", "norm": metric, "class_cosine": metric}, {"row": "tap", "error": "x"}]
    )
    assert "| ops | norm | 90.00 | 80.00 | 100.00 | 88.90 |" in lines
    assert "| ops | class_cosine | 90.00 | 80.00 | 100.00 | 88.90 |" in lines
    assert not [line for line in lines if line.startswith("| tap")]
    assert detection_markdown([{"row": "tap"}]) == []


def test_the_analyses_plan_a_clean_control_for_the_disentanglement_check_only():
    from raypurify.experiments.steps import plan

    steps = {s.name: s for s in plan(load_spec("cifar10-mini", ["analyses=[disentangle, detect]"]))}
    assert {"disentangle/tap", "detect/tap", "train/tap/clean+p_hat/fast-resnet"} <= set(steps)
    control = steps["disentangle/clean"]  # clean + the p_hat of a stage 1 trained on clean data
    assert [i.name for i in control.inputs] == ["data/clean", "data/clean", "purify/clean/d-vae"]
    assert "train/clean/clean+p_hat/fast-resnet" in steps
    assert "detect/clean" not in steps  # nothing poisoned to detect
    without = {
        s.name
        for s in plan(load_spec("cifar10-mini", ["analyses=[disentangle]", "clean_row=[none]"]))
    }
    assert "disentangle/tap" in without and "disentangle/clean" not in without  # no P for it


def test_the_ablation_preset_plans_each_ablation_and_analyses_read_a_stage_1():
    """Each column of the shipped ablation table purifies with its own ablation; the
    analyses, which read stage 1's p_hat, skip a column without stage 1 even when it
    comes first."""
    from raypurify.experiments.steps import plan

    steps = {s.name: s for s in plan(load_spec("ablation"))}
    for column, ablation in [
        ("dvae", "none"),
        ("without-stage1", "without-stage1"),
        ("without-p2", "without-p2"),
        ("stage1-only", "stage1-only"),
    ]:
        for row in ("em-class", "ar"):
            resolved = steps[f"purify/{row}/{column}"].config["resolved"]
            assert resolved.get("ablation", "none") == ablation, (row, column)
            assert f"train/{row}/{column}/fast-resnet" in steps
    reordered = load_spec(
        "ablation",
        [
            "analyses=[detect]",
            "defenses=[{name: none}, "
            + ", ".join(
                f"{{name: dvae, label: {c}, options: {{overrides: [ablation={c}]}}}}"
                for c in ("without-stage1", "without-p2")
            )
            + "]",
        ],
    )
    detect = {s.name: s for s in plan(reordered)}["detect/ar"]
    assert detect.meta["column"] == "without-p2"


@pytest.mark.parametrize(
    "value, message",
    [("[jpeg]", r"clean_row names unknown columns \['jpeg'\]"), ("[]", "clean_row: give true")],
)
def test_a_clean_row_naming_no_or_unknown_columns_is_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        load_spec("cifar10-mini", [f"clean_row={value}"])


def test_a_dataset_directory_rewritten_in_place_is_copied_again(tmp_path):
    """The clean step names a dataset directory by path in its key and by content in its
    record: the same spec over rewritten files does not reuse the old copy."""
    from raypurify.data.imageset import ImageSet
    from raypurify.data.interchange import write_images
    from raypurify.experiments.runner import execute, resolve
    from raypurify.experiments.steps import plan
    from raypurify.experiments.store import Store

    def write(seed: int) -> None:
        pixels = np.random.default_rng(seed).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
        data = ImageSet(pixels, np.arange(20) % 2, np.arange(20), ["a", "b"])
        write_images(data, tmp_path / "data", overwrite=True)

    def clean_step():
        spec = load_spec("demo", [f"dataset={{name: parquet, path: {tmp_path / 'data'}}}"])
        return plan(spec)[0]

    store = Store(tmp_path / "store")
    write(0)
    step = clean_step()
    assert not resolve(step, store)
    first = execute(step, store, None)["sha256"]
    assert resolve(again := clean_step(), store) and again.result["sha256"] == first
    write(1)
    assert not resolve(changed := clean_step(), store)  # the old copy is forgotten
    assert changed.dir == step.dir and not step.dir.exists()
    assert execute(changed, store, None)["sha256"] != first


def test_the_table_seed_seeds_its_purifiers_and_seed_0_keeps_stored_keys():
    from raypurify.experiments.steps import plan

    def purify(overrides):
        return {s.name: s for s in plan(load_spec("cifar10-mini", overrides))}["purify/ops/d-vae"]

    default, seeded = purify([]), purify(["seed=3"])
    assert default.config["resolved"]["seed"] == 0
    assert not any(o.startswith("seed=") for o in default.config["options"]["overrides"])
    assert seeded.config["resolved"]["seed"] == 3
    assert seeded.config != default.config  # so its key differs: no reuse across seeds


def test_warm_groups_are_for_local_cpu_runs_and_can_be_turned_off(
    ray_session, tmp_path, monkeypatch
):
    import contextlib

    from raypurify.experiments.runner import warm_workers
    from raypurify.worker_group import warm_workers as warm

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not isinstance(warm_workers(2, tmp_path), contextlib.nullcontext)  # a group per lane
    monkeypatch.setenv("RAYPURIFY_WARM_GROUP", "0")
    assert isinstance(warm_workers(1, tmp_path), contextlib.nullcontext)
    monkeypatch.setenv("RAYPURIFY_WARM_GROUP", "yes")
    with pytest.raises(ConfigError, match="RAYPURIFY_WARM_GROUP: 'yes'"):
        warm_workers(1, tmp_path)
    monkeypatch.setenv("RAYPURIFY_WARM_GROUP", "1")
    # GPU fits: a group's worker would hold the GPU that purification passes need.
    assert isinstance(warm(1, "cuda", tmp_path), contextlib.nullcontext)
    assert isinstance(warm(1, "cpu", tmp_path, wanted=False), contextlib.nullcontext)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a cluster: steps start their own
    assert isinstance(warm_workers(1, tmp_path), contextlib.nullcontext)


def test_the_image_figure_shows_each_attack_on_images_of_different_classes(tmp_path):
    """images.png's rows for an attack are the first image (lowest index) of each of the
    first classes, so a class-wise poison shows as another pattern on each row."""
    from raypurify.data.imageset import ImageSet
    from raypurify.data.interchange import write_images
    from raypurify.reports.figures import examples

    labels = np.array([1, 1, 2, 0, 2, 0])
    index = np.array([50, 10, 30, 40, 20, 60])  # each class's lowest: 0 -> 40, 1 -> 10, 2 -> 20
    images = np.zeros((6, 8, 8, 3), np.uint8)
    write_images(ImageSet(images, labels, index, ["cat", "dog", "frog"]), tmp_path / "p")
    ids, names = examples(tmp_path / "p", per_attack=2)
    assert ids.tolist() == [40, 10] and names == ["cat", "dog"]
    ids, names = examples(tmp_path / "p", per_attack=5)
    assert ids.tolist() == [40, 10, 20] and names == ["cat", "dog", "frog"]


NOISE = Path(load_spec("demo").attacks[0].released.paths[0])  # the demo's shipped poison


def released_spec(tmp_path: Path, noise: Path, extra: str = "") -> Path:
    """A one-row table importing `noise` (a path relative to the spec file's folder)."""
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        "name: released\ndataset: {name: cifar10-sample, subset: 100}\n"
        "test: {name: cifar10-sample, split: test, subset: 100}\nclean_row: false\n"
        f"attacks:\n  - name: em\n    label: em-class\n{extra}"
        f"    released: {{format: perturbation, paths: [{noise.name}]}}\n"
        "defenses: [{name: none}]\n"
        "classifiers: [{overrides: [epochs=1, arch_options.width=8, batch_size=32]}]\n"
    )
    return spec


def test_a_released_poison_is_keyed_by_its_content_not_its_path_or_the_seed(tmp_path):
    from raypurify.experiments.steps import plan

    def poison_config(folder: Path, overrides=()) -> dict:
        spec = load_spec(str(released_spec(folder, folder / "noise.npy")), overrides)
        return {s.name: s for s in plan(spec)}["poison/em-class"].config

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(NOISE, tmp_path / name / "noise.npy")
    first = poison_config(tmp_path / "a")  # the path read from the spec file's folder
    assert first["released"]["sha256"] and "paths" not in first["released"]
    assert poison_config(tmp_path / "b") == first  # the same content elsewhere
    assert poison_config(tmp_path / "a", ["seed=3"]) == first  # nothing random in an import
    edited = np.load(tmp_path / "b" / "noise.npy")
    edited[0, 0, 0, 0] = -edited[0, 0, 0, 0] or 1
    np.save(tmp_path / "b" / "noise.npy", edited)
    assert poison_config(tmp_path / "b")["released"]["sha256"] != first["released"]["sha256"]


@pytest.mark.parametrize(
    "change, message",
    [
        (("noise.npy", "missing.npy"), r"attacks\.0\.released\.paths\.0: .*missing\.npy: no such"),
        (("format: perturbation", "format: pngs"), r"attacks\.0\.released: .*format.*pngs"),
        (("    released:", "    options: {eps: 0.1}\n    released:"), "released.options"),
        (("    released:", "    ratio: 0.5\n    released:"), "ratio must be 1"),
    ],
)
def test_a_released_poison_with_a_bad_field_is_refused_before_any_work(change, message, tmp_path):
    shutil.copy(NOISE, tmp_path / "noise.npy")
    spec = released_spec(tmp_path, tmp_path / "noise.npy")
    spec.write_text(spec.read_text().replace(*change))
    with pytest.raises(ConfigError, match=message):
        run_experiment(load_spec(str(spec)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_a_released_poison_over_its_attacks_budget_fails_its_row_with_one_line(
    ray_session, mlflow_uri, tmp_path
):
    np.save(tmp_path / "noise.npy", np.load(NOISE).astype(np.int16) * 2)  # 16/255 > 8/255
    spec = load_spec(str(released_spec(tmp_path, tmp_path / "noise.npy")), ["max_parallel=2"])
    with pytest.raises(RaypurifyError, match="poison/em-class") as failed:
        run_experiment(spec, tmp_path / "out")
    assert "noise.npy: poison over the protocol budget (linf" in str(failed.value)
    assert not list((tmp_path / "out" / "store").glob("train/*/step.json"))  # nothing trained
