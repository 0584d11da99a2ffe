"""The `raypurify` command line, run in-process (reusing the session's Ray) and once as a
real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from raypurify import __version__
from raypurify.cli import main
from raypurify.data.interchange import MANIFEST, open_dataset, read_images
from raypurify.data.registry import SOURCES
from raypurify.errors import DatasetError


def test_version_and_help_as_a_subprocess():
    run = [sys.executable, "-m", "raypurify"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"raypurify {__version__}"

    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: raypurify")
    assert "datasets" in helped.stdout
    assert "--version" in helped.stdout


def test_help_and_the_listings_do_not_import_torch_or_ray():
    """`--help`, `--version`, `presets`, `spaces` and `datasets list` answer without torch or Ray,
    which take seconds to import: the dataset registry that every command loads imports
    them only when a dataset is made."""
    for args in (["--help"], ["--version"], ["presets"], ["spaces"], ["datasets", "list"]):
        run = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "raypurify", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr[-500:]
        imported = {
            line.rsplit("|", 1)[-1].strip()
            for line in run.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert "raypurify.cli" in imported
        assert not imported & {"torch", "ray"}, (args, sorted(imported & {"torch", "ray"}))


def test_datasets_list(capsys):
    assert main(["datasets", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == SOURCES.names()
    for line, src in zip(lines, SOURCES, strict=True):
        assert line.endswith(src.description)


def test_export_show_and_refused_second_export(ray_session, tmp_path, capsys):
    out = tmp_path / "sample"
    assert main(["datasets", "export", "cifar10-sample", "--out", str(out), "--subset", "100"]) == 0
    printed = capsys.readouterr().out
    info = open_dataset(out)
    assert printed.strip() == f"wrote 100 images to {out} (id {info.id})"
    assert info.rows == 100
    assert info.manifest["config"]["dataset"]["name"] == "cifar10-sample"
    assert info.manifest["config"]["dataset"]["subset"] == 100
    assert info.manifest["parents"] == [{"source": "cifar10-sample", "split": "train"}]
    data = read_images(out)
    assert np.array_equal(data.class_counts(), [10] * 10)

    # show: rows, the class histogram, pixel statistics, and a grid PNG beside the dataset.
    assert main(["datasets", "show", str(out)]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == f"dataset   {out}  (id {info.id})"
    assert shown[1].split()[:2] == ["rows", "100"]
    assert "images 32x32x3" in shown[1] and "classes 10" in shown[1]
    histogram = [line for line in shown if line.startswith("    ")]
    assert len(histogram) == 10
    assert histogram[0].split()[:3] == ["0", "airplane", "10"]
    assert all(line.split()[2] == "10" and line.rstrip().endswith("#" * 30) for line in histogram)
    mean = next(line for line in shown if line.startswith("pixel mean"))
    r = float(mean.split()[3])
    assert r == pytest.approx(data.images[..., 0].mean(), abs=0.01)
    assert any(line == "lineage   cifar10-sample" for line in shown)
    grid_path = tmp_path / "sample-grid.png"
    assert shown[-1] == f"grid      {grid_path}"
    with Image.open(grid_path) as grid:
        # 10 classes x 8 examples, each tile scaled to 64 px with 2 px padding.
        assert grid.size == (8 * 66 + 2, 10 * 66 + 2)
    assert main(["datasets", "show", str(out)]) == 0  # its own grid: written again
    assert capsys.readouterr().out.splitlines()[-1] == f"grid      {grid_path}"

    # Exporting again to the same place fails cleanly and leaves the data alone.
    code = main(["datasets", "export", "cifar10-sample", "--out", str(out), "--subset", "50"])
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"error: {out} already exists; pass --overwrite to replace it\n"
    assert open_dataset(out).sha256 == info.sha256

    # --overwrite replaces it.
    again = ["datasets", "export", "cifar10-sample", "--out", str(out), "--subset", "50"]
    assert main([*again, "--overwrite"]) == 0
    assert open_dataset(out).rows == 50
    assert read_images(out).class_counts().tolist() == [5] * 10


def test_set_with_unknown_key_names_it(tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["datasets", "export", "synthetic", "--out", str(out), "--set", "colour=red"])
    assert code == 2
    assert capsys.readouterr().err == (
        "error: dataset, --set colour=red: colour: unknown key"
        " (known: name, split, path, subset, seed, size, classes, rows)\n"
    )
    code = main(["datasets", "export", "synthetic", "--out", str(out), "--set", "rows=many"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset, --set rows=many: rows: Input should be a valid")
    assert err.count("\n") == 1
    code = main(["datasets", "export", "synthetic", "--out", str(out), "--set", "rows"])
    assert code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert not out.exists()


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["datasets", "show", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'}: no such dataset directory\n"
    assert main(["datasets", "export", "mnist", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: unknown dataset 'mnist'")


def test_bad_arguments_exit_with_one_line(capsys):
    for argv, says in [
        ([], "required: COMMAND"),
        (["datasets", "export", "synthetic"], "--out"),
        (["train"], "required: --data, --test, --out"),
        (["purify", "--data", "d", "--out", "o", "--bogus"], "unrecognized arguments: --bogus"),
        (["sweep", "demo", "--out", "o", "--samples", "0"], "--samples: 0 is not at least 1"),
        (["sweep", "demo", "--out", "o", "--concurrency", "x"], "'x' is not a whole number"),
    ]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: raypurify") and says in err, err
        assert err.count("\n") == 1 and "--help" in err, err


def test_output_cut_short_by_its_reader_is_no_traceback():
    """`raypurify presets | head -1`: the reader closes the pipe early; no BrokenPipeError."""
    shown = subprocess.run(
        f"{sys.executable} -m raypurify presets | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert len(shown.stdout.splitlines()) == 1
    assert "Traceback" not in shown.stderr and "BrokenPipe" not in shown.stderr, shown.stderr


def _takes(command: str, setting: str) -> None:
    """Build `command`'s own config with `setting` applied (raises for a key it lacks)."""
    from raypurify import config
    from raypurify.attacks.base import configure
    from raypurify.data.spec import DatasetSpec
    from raypurify.defenses.dvae.config import preset
    from raypurify.experiments import load_spec
    from raypurify.sweeps.space import load_space
    from raypurify.training.config import recipe

    takes = {
        "train": lambda: recipe("cpu", [setting]),
        "analyze disentangle": lambda: recipe("cpu", [setting]),
        "purify": lambda: preset("cpu", [setting]),
        "run": lambda: load_spec("demo", [setting]),
        "report": lambda: load_spec("demo", [setting]),
        "sweep": lambda: load_space("demo", [setting]),
        "poison": lambda: configure("lsp", {}, [setting]),
        "datasets export": lambda: config.load(DatasetSpec, {"name": "synthetic"}, [setting]),
    }
    takes[command]()


COMMANDS = ["train", "analyze disentangle", "purify", "run", "report", "sweep", "poison"]


@pytest.mark.parametrize("command", [*COMMANDS, "datasets export"])
def test_each_commands_set_example_is_a_key_it_takes(command, capsys):
    """Every command's --help shows a `--set` example of its own config's keys."""
    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    text = " ".join(capsys.readouterr().out.split())
    example = text.split("override a config value, e.g. --set ", 1)[1].split()[0]
    _takes(command, example)


def test_show_writes_its_grid_only_where_nothing_else_is(tmp_path, monkeypatch, capsys):
    """`datasets show` reads a dataset; its grid never replaces a file it did not write
    (the dataset's own manifest, a user's file): an asked-for --grid there is refused
    before any row is read, and the default place beside the dataset is skipped, saying
    why, with the summary still printed."""
    out = tmp_path / "sample"
    assert main(["datasets", "export", "cifar10-sample", "--out", str(out), "--subset", "20"]) == 0
    manifest = (out / MANIFEST).read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    capsys.readouterr()
    for grid in (out / MANIFEST, out / "new.png", notes):
        assert main(["datasets", "show", str(out), "--grid", str(grid)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --grid {grid}: ") and err.count("\n") == 1, err
    assert (out / MANIFEST).read_bytes() == manifest and notes.read_text() == "mine"
    assert not (out / "new.png").exists()

    (tmp_path / "sample-grid.png").write_text("a user's file of that name")
    monkeypatch.chdir(out)  # `show .`: the default grid is named after the folder
    assert main(["datasets", "show", "."]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith(f"grid      not written ({tmp_path / 'sample-grid.png'}: exists")
    assert (tmp_path / "sample-grid.png").read_text() == "a user's file of that name"


def test_a_manifest_claiming_poison_flags_its_files_lack_is_refused(tmp_path):
    out = tmp_path / "sample"
    assert main(["datasets", "export", "cifar10-sample", "--out", str(out), "--subset", "20"]) == 0
    m = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps(m | {"has_poisoned": True}))
    with pytest.raises(DatasetError, match="has_poisoned, but .* has no 'poisoned' column"):
        open_dataset(out)


def test_an_export_of_a_dataset_directory_records_its_id_and_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["datasets", "export", "cifar10-sample", "--out", "s", "--subset", "20"]) == 0
    assert main(["datasets", "export", "s", "--out", "sub", "--subset", "10"]) == 0
    (parent,) = open_dataset(tmp_path / "sub").manifest["parents"]
    s = open_dataset(tmp_path / "s")
    assert parent == {"id": s.id, "sha256": s.sha256, "path": str(tmp_path / "s")}


@pytest.mark.parametrize(
    "listing", [["presets"], ["spaces"], ["datasets", "list"], ["datasets", "verify", "x"]]
)
def test_the_listings_take_no_settings_they_would_ignore(listing, capsys):
    with pytest.raises(SystemExit) as e:
        main([*listing, "--set", "seed=1"])
    assert e.value.code == 2 and "unrecognized arguments: --set" in capsys.readouterr().err


def test_a_listing_shows_a_descriptions_first_sentence_cut_at_a_word():
    from raypurify.cli.common import gist

    assert gist("Short one.  Second\\n sentence.") == "Short one"
    long = gist("word " * 40)
    assert len(long) <= 96 and long.endswith("word …")
    assert gist(None) == ""
