"""Every bad input is one line on stderr and exit code 2, with no traceback, nothing left
behind in the working tree, and (for input that can be checked first) Ray never started.

The table runs the real command line in-process (`raypurify.cli.main`), each case in a
fresh folder holding a small real dataset, and compares a listing of that folder (names,
sizes, modification times) before and after. A few cases also run as a real subprocess to
check what the terminal shows.
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raypurify.cli import main
from raypurify.data.imageset import ImageSet
from raypurify.data.interchange import MANIFEST, write_images

CLASSES = ["a", "b", "c"]


def small_set(n: int = 30, seed: int = 0, classes: int = 3, size: int = 8) -> ImageSet:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageSet(images, np.arange(n) % classes, np.arange(n), CLASSES)


def edit_manifest(d: Path, **changes) -> None:
    m = json.loads((d / MANIFEST).read_text())
    for k, v in changes.items():
        if v is DROP:
            m.pop(k, None)
        else:
            m[k] = v
    (d / MANIFEST).write_text(json.dumps(m))


DROP = object()


def legacy(d: Path) -> None:
    """A manifest as written before per-file records (no file_info)."""
    edit_manifest(d, file_info=DROP)


def corrupt_middle(f: Path) -> None:
    blob = bytearray(f.read_bytes())
    mid = len(blob) // 2
    blob[mid : mid + 64] = bytes(64)
    f.write_bytes(bytes(blob))


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def spec_yaml(dataset: str, test: str, extra: str = "") -> str:
    return (
        f"name: t\ndataset: {dataset}\ntest: {test}\nattacks: [{{name: lsp}}]\n"
        f"defenses: [{{name: none}}]\n{extra}"
    )


@dataclass
class Case:
    name: str
    argv: Callable[[Path], list[str]]  # given the folder holding `good` (a dataset)
    setup: Callable[[Path], None] = lambda root: None
    expect: str = ""  # a fragment of the one-line message


def experiment_dir(root: Path, record: str | None, run_json: str | None = None) -> Path:
    exp = root / "exp"
    step = exp / "store" / "train" / "x-0123"
    step.mkdir(parents=True)
    if record is not None:
        (step / "step.json").write_text(record)
    spec = {
        "name": "t",
        "dataset": {"name": "synthetic"},
        "test": {"name": "synthetic", "split": "test"},
        "attacks": [{"name": "lsp"}],
        "defenses": [{"name": "none"}],
    }
    run = run_json if run_json is not None else json.dumps({"spec": spec, "steps": [str(step)]})
    (exp / "run.json").write_text(run)
    return exp


def pt(root: Path, name: str, value) -> None:
    torch.save(value, root / name)


class Evil:
    def __reduce__(self):
        return (print, ("pickle executed",))


def run_demo(setting: str):
    """`run demo` with one `--set`; `{root}` in it names the case's folder."""
    return lambda r: ["run", "demo", "--out", str(r / "o"), "--set", setting.format(root=r)]


def poison_import(fmt: str, src: str, *extra: str):
    return lambda r: [
        "poison",
        "import",
        "--format",
        fmt,
        "--from",
        str(r / src),
        "--base",
        str(r / "good"),
        "--out",
        str(r / "out"),
        *extra,
    ]


def poison_lsp(*extra: str):
    return lambda r: [
        "poison",
        "--attack",
        "lsp",
        "--data",
        str(r / "good"),
        "--out",
        str(r / "o"),
        *extra,
    ]


def train(*extra: str, data: str = "good", out: str = "out"):
    return lambda r: [
        "train",
        "--data",
        str(r / data),
        "--test",
        str(r / "good"),
        "--out",
        str(r / out),
        "--recipe",
        "cpu",
        *extra,
    ]


CASES = [
    # datasets -------------------------------------------------------------------------
    Case("export unknown", lambda r: ["datasets", "export", "nope", "--out", str(r / "o")]),
    *[
        Case(
            f"{what} with --split test on a dataset directory of one split",
            lambda r, argv=argv: [*argv(r), "--out", str(r / "o"), "--split", "test"],
            expect=" is a dataset directory of one split",
        )
        for what, argv in [
            ("export", lambda r: ["datasets", "export", str(r / "good")]),
            ("poison", lambda r: ["poison", "--attack", "lsp", "--data", str(r / "good")]),
        ]
    ],
    Case(
        "export over user dir",
        lambda r: ["datasets", "export", "synthetic", "--out", str(r / "mine"), "--overwrite"],
        lambda r: (r / "mine").mkdir() or (r / "mine" / "notes.txt").write_text("mine"),
        "not written by raypurify",
    ),
    Case(
        "export onto its input",
        lambda r: ["datasets", "export", str(r / "good"), "--out", str(r / "good"), "--overwrite"],
        expect="is the input",
    ),
    Case(
        "export into parent of input",
        lambda r: ["datasets", "export", str(r / "good"), "--out", str(r), "--overwrite"],
        expect="contains the input",
    ),
    Case(
        "export subset 0",
        lambda r: ["datasets", "export", "synthetic", "--subset", "0", "--out", str(r / "o")],
    ),
    Case("show missing", lambda r: ["datasets", "show", str(r / "nope")]),
    Case(
        "show a registered name",
        lambda r: ["datasets", "show", "cifar10-sample"],
        expect="raypurify datasets export cifar10-sample --out DIR",
    ),
    Case(
        "verify a registered name",
        lambda r: ["datasets", "verify", "synthetic"],
        expect="a registered dataset, not a directory",
    ),
    Case("show a file", lambda r: ["datasets", "show", str(r / "good" / MANIFEST)]),
    Case(
        "manifest not JSON",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: (r / "good" / MANIFEST).write_text("{oops"),
        "invalid JSON",
    ),
    Case(
        "manifest a list",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: (r / "good" / MANIFEST).write_text("[1, 2]"),
    ),
    Case(
        "files outside (..)",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: edit_manifest(r / "good", files=["../good/part-00000.parquet"]),
        "not a plain name",
    ),
    Case(
        "files absolute",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: edit_manifest(r / "good", files=[str(r / "good" / "part-00000.parquet")]),
        "not a plain name",
    ),
    Case(
        "file listed twice",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: edit_manifest(r / "good", files=["part-00000.parquet"] * 2),
        "listed more than once",
    ),
    Case(
        "rows a string",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: edit_manifest(r / "good", rows="30"),
        "'rows'",
    ),
    Case(
        "sha256 missing",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: edit_manifest(r / "good", sha256=DROP),
        "'sha256'",
    ),
    Case(
        "classes wrong type",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: edit_manifest(r / "good", classes="abc"),
        "'classes'",
    ),
    Case(
        "height null",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: edit_manifest(r / "good", height=None),
        "'height'",
    ),
    Case(
        "files missing",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: edit_manifest(r / "good", files=DROP),
        "'files'",
    ),
    Case(
        "parents not a list",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: edit_manifest(r / "good", parents="x"),
        "'parents'",
    ),
    Case(
        "file_info of the wrong type",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: edit_manifest(r / "good", file_info={"part-00000.parquet": 3}),
        "file_info",
    ),
    Case(
        "manifest not UTF-8",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: (r / "good" / MANIFEST).write_bytes(b"\xff\xfe{\x00}\x00"),
        "invalid JSON",
    ),
    Case(
        "corrupt parquet bytes",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: corrupt_middle(r / "good" / "part-00000.parquet"),
    ),
    Case(
        "corrupt parquet bytes, legacy manifest",
        lambda r: ["datasets", "show", str(r / "good")],
        lambda r: (legacy(r / "good"), corrupt_middle(r / "good" / "part-00000.parquet")),
    ),
    Case(
        "grid into a missing folder",
        lambda r: ["datasets", "show", str(r / "good"), "--grid", str(r / "no" / "g.png")],
        expect="does not exist",
    ),
    Case(
        "verify edited content",
        lambda r: ["datasets", "verify", str(r / "good")],
        lambda r: (
            legacy(r / "good"),
            edit_manifest(r / "good", sha256="ab" * 32),
        ),
        "does not match",
    ),
    # poison import --------------------------------------------------------------------
    Case(
        "import without --out",
        lambda r: [
            "poison",
            "import",
            "--format",
            "perturbation",
            "--from",
            str(r / "d.npy"),
            "--base",
            str(r / "good"),
        ],
        expect="--out",
    ),
    Case("import unknown format", poison_import("nope", "d.npy")),
    Case("import missing file", poison_import("perturbation", "missing.pt")),
    Case(
        "import a folder where an array file is expected",
        poison_import("perturbation", "good"),
        expect="good: a folder; give the array's file",
    ),
    Case(
        "import a png file where a folder of them is expected",
        poison_import("png", "one.png"),
        lambda r: (r / "one.png").write_bytes(b"x"),
        expect="one.png: a file; the png format reads a folder",
    ),
    Case(
        "import pickle .pt",
        poison_import("perturbation", "evil.pt"),
        lambda r: (r / "evil.pt").write_bytes(pickle.dumps(Evil())),
    ),
    Case(
        "import pickled object in a torch file",
        poison_import("perturbation", "evil2.pt"),
        lambda r: pt(r, "evil2.pt", {"noise": Evil()}),
    ),
    Case(
        "import dict .pt",
        poison_import("perturbation", "dict.pt"),
        lambda r: pt(r, "dict.pt", {"noise": torch.zeros(3)}),
        "expected one tensor",
    ),
    Case(
        "import bf16 .pt of the wrong shape",
        poison_import("perturbation", "bf16.pt"),
        lambda r: pt(r, "bf16.pt", torch.zeros(30, 3, 8, dtype=torch.bfloat16)),
        "shape",
    ),
    Case(
        "import sparse .pt",
        poison_import("perturbation", "sparse.pt"),
        lambda r: pt(r, "sparse.pt", torch.zeros(30, 3, 8, 8).to_sparse()),
        "sparse",
    ),
    Case(
        "import garbage .pt",
        poison_import("perturbation", "junk.pt"),
        lambda r: (r / "junk.pt").write_bytes(b"\x00garbage" * 10),
    ),
    Case(
        "import object .npy",
        poison_import("perturbation", "obj.npy"),
        lambda r: np.save(r / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
    ),
    Case(
        "import string .npy",
        poison_import("perturbation", "str.npy"),
        lambda r: np.save(r / "str.npy", np.full((30, 3, 8, 8), "x")),
        "expected numbers",
    ),
    Case(
        "import over budget",
        poison_import("perturbation", "big.npy"),
        lambda r: np.save(r / "big.npy", np.full((30, 3, 8, 8), 0.5, np.float32)),
        "--allow-over-budget",
    ),
    Case(
        "import npz of strings",
        poison_import("npz", "s.npz"),
        lambda r: np.savez(r / "s.npz", x=np.full((30, 8, 8, 3), "a"), y=np.arange(30) % 3),
        "expected numbers",
    ),
    Case(
        "import npz that is no zip",
        poison_import("npz", "g.npz"),
        lambda r: (r / "g.npz").write_bytes(b"PK\x03\x04garbage"),
        "unreadable",
    ),
    Case(
        "import corrupt png",
        poison_import("png", "pngs"),
        lambda r: ((r / "pngs").mkdir(), (r / "pngs" / "0.png").write_bytes(b"\x89PNG junk")),
        "undecodable",
    ),
    Case(
        "import onto its base",
        lambda r: [
            "poison",
            "import",
            "--format",
            "perturbation",
            "--from",
            str(r / "d.npy"),
            "--base",
            str(r / "good"),
            "--out",
            str(r / "good"),
            "--overwrite",
        ],
        expect="is the input",
    ),
    Case(
        "import base missing",
        lambda r: [
            "poison",
            "import",
            "--format",
            "perturbation",
            "--from",
            str(r / "d.npy"),
            "--base",
            str(r / "no"),
            "--out",
            str(r / "out"),
        ],
    ),
    # poison ---------------------------------------------------------------------------
    Case(
        "poison unknown attack",
        lambda r: [
            "poison",
            "--attack",
            "nope",
            "--data",
            str(r / "good"),
            "--out",
            str(r / "out"),
        ],
    ),
    Case(
        "poison without --out", lambda r: ["poison", "--attack", "lsp", "--data", str(r / "good")]
    ),
    Case(
        "poison unknown option",
        poison_lsp("--set", "bogus=1"),
    ),
    Case(
        "poison surrogate option",
        lambda r: [
            "poison",
            "--attack",
            "em",
            "--data",
            str(r / "good"),
            "--out",
            str(r / "o"),
            "--set",
            "surrogate=fast-resnet",
            "--set",
            "surrogate_options.depth=3",
        ],
        expect="surrogate_options",
    ),
    # train ----------------------------------------------------------------------------
    Case("train data missing", train(data="nope")),
    Case(
        "train unknown arch option", train("--set", "arch_options.depth=3"), expect="arch_options"
    ),
    Case("train unknown recipe", lambda r: train()(r)[:-1] + ["nope"]),
    Case("train unknown defence", train("--defense", "nope")),
    Case("train zero epochs", train("--set", "epochs=0")),
    Case("train onto its data", train("--overwrite", out="good"), expect="is the input"),
    Case(
        "train over user files",
        train("--overwrite", out="mine"),
        lambda r: (r / "mine").mkdir() or (r / "mine" / "notes.txt").write_text("mine"),
        "not written by",
    ),
    Case(
        "train on a one-class set",
        train(data="one"),
        lambda r: write_images(
            ImageSet(small_set().images, np.zeros(30, int), np.arange(30), CLASSES), r / "one"
        ),
        "at least 2 classes",
    ),
    Case(
        "train with a test set of other classes",
        train(data="train"),
        lambda r: (
            shutil.rmtree(r / "good"),
            write_images(small_set(), r / "train"),
            write_images(
                ImageSet(small_set().images, np.arange(30) % 2, np.arange(30), ["x", "y"]),
                r / "good",
            ),
        ),
        "classes",
    ),
    Case(
        "train on fewer rows than a batch",
        train(),  # 30 rows, the cpu recipe's batch of 256
        expect="batch_size: ",
    ),
    Case(
        "train into a dataset without --overwrite",
        train(out="other"),
        lambda r: write_images(small_set(), r / "other"),
        "holds a dataset",
    ),
    Case(
        "export with a negative seed",
        lambda r: ["datasets", "export", "synthetic", "--out", str(r / "o"), "--seed", "-1"],
        expect="seed",
    ),
    Case(
        "export into a path under a file",
        lambda r: ["datasets", "export", "synthetic", "--out", str(r / "afile" / "x")],
        lambda r: (r / "afile").write_text("mine"),
        "afile",
    ),
    Case("poison with a negative seed", poison_lsp("--seed", "-1"), expect="seed"),
    Case(
        "export with --num-cpus 0",
        lambda r: ["datasets", "export", "synthetic", "--out", str(r / "o"), "--num-cpus", "0"],
        expect="--num-cpus",
    ),
    # purify ---------------------------------------------------------------------------
    Case(
        "purify data missing", lambda r: ["purify", "--data", str(r / "no"), "--out", str(r / "o")]
    ),
    Case(
        "purify unknown preset",
        lambda r: ["purify", "--data", str(r / "good"), "--preset", "nope", "--out", str(r / "o")],
    ),
    Case(
        "purify unknown key",
        lambda r: [
            "purify",
            "--data",
            str(r / "good"),
            "--out",
            str(r / "o"),
            "--set",
            "stage9.epochs=1",
        ],
    ),
    Case(
        "purify onto its input",
        lambda r: ["purify", "--data", str(r / "good"), "--out", str(r / "good"), "--overwrite"],
        expect="is the input",
    ),
    Case(
        "purify over user files",
        lambda r: ["purify", "--data", str(r / "good"), "--out", str(r / "mine"), "--overwrite"],
        lambda r: (r / "mine").mkdir() or (r / "mine" / "notes.txt").write_text("mine"),
        "not written by",
    ),
    Case(
        "purify into another run",
        lambda r: ["purify", "--data", str(r / "good"), "--out", str(r / "p"), "--preset", "cpu"],
        lambda r: __import__("raypurify.atomic").atomic.mark(r / "p", what={"input": "x"}),
        "another config or input",
    ),
    Case(
        "purify on fewer rows than a batch",
        lambda r: [
            "purify",
            "--data",
            str(r / "good"),
            "--out",
            str(r / "p"),
            "--preset",
            "cpu",
            "--set",
            "stage1.batch_size=16",
        ],
        expect="stage2.batch_size: ",  # 30 rows, the cpu preset's stage-2 batch of 32
    ),
    # run ------------------------------------------------------------------------------
    Case("run unknown preset", lambda r: ["run", "nope", "--out", str(r / "o")]),
    Case(
        "run with an unknown test set",
        run_demo("test.name=cifar-10"),
        expect="test.name: unknown dataset 'cifar-10'",
    ),
    Case(
        "run with a training subset larger than the sample",
        run_demo("dataset.subset=100000"),
        expect="subset of 100000 needs 10000 images of class 0, only 250 exist",
    ),
    Case(
        "run with a subset larger than a dataset directory",
        run_demo("dataset={{name: parquet, path: {root}/good, subset: 60}}"),
        expect="subset of 60 needs 20 images of class 0, only 10 exist",
    ),
    Case(
        "run with a CIFAR-10 test subset larger than its split",
        run_demo("test={{name: cifar10, split: test, subset: 10001}}"),
        expect="cifar10/test: subset of 10001 needs 1001 images",
    ),
    Case(
        "run with a --force that matches no step",
        lambda r: ["run", "demo", "--out", str(r / "o"), "--force", "train/lssp/*"],
        expect="--force train/lssp/*: matches no step",
    ),
    Case(
        "ui --sweep on a file",
        lambda r: ["ui", "--sweep", str(r / "good" / MANIFEST)],
        expect="a file, not a sweep's folder",
    ),
    Case(
        "run into a folder of the user's",
        lambda r: ["run", "demo", "--out", str(r / "mine")],
        lambda r: (r / "mine").mkdir() or (r / "mine" / "results.md").write_text("mine"),
        "holds no experiment",
    ),
    Case(
        "run with max_parallel 0",
        lambda r: ["run", "demo", "--out", str(r / "o"), "--set", "max_parallel=0"],
        expect="max_parallel",
    ),
    Case(
        "run with a missing training set",
        lambda r: ["run", str(r / "s.yaml"), "--out", str(r / "o")],
        lambda r: write_yaml(
            r / "s.yaml",
            spec_yaml(f"{{name: parquet, path: {r / 'nope'}}}", "{name: synthetic, split: test}"),
        ),
    ),
    Case(
        "run with an unknown arch option",
        lambda r: ["run", str(r / "s.yaml"), "--out", str(r / "o")],
        lambda r: write_yaml(
            r / "s.yaml",
            spec_yaml(
                "{name: synthetic}",
                "{name: synthetic, split: test}",
                "classifiers: [{recipe: cpu, overrides: [arch_options.depth=3]}]\n",
            ),
        ),
        "classifiers.0.arch_options",
    ),
    Case(
        "run with a defence option out of range",
        lambda r: ["run", str(r / "s.yaml"), "--out", str(r / "o")],
        lambda r: write_yaml(
            r / "s.yaml",
            "name: t\ndataset: {name: synthetic}\ntest: {name: synthetic, split: test}\n"
            "attacks: [{name: lsp}]\ndefenses: [{name: jpeg, options: {quality: 500}}]\n",
        ),
        "defenses.0.options: quality",
    ),
    Case(
        "run with a binary YAML file",
        lambda r: ["run", str(r / "s.yaml"), "--out", str(r / "o")],
        lambda r: (r / "s.yaml").write_bytes(b"\xff\xfe\x00garbage"),
        "UTF-8",
    ),
    Case(
        "train with a negative width",
        train("--set", "arch_options.width=-1"),
        expect="arch_options",
    ),
    Case(
        "train with a width that is no number",
        train("--set", "arch_options.width=abc"),
        expect="arch_options.width: 'abc' must be a whole number",
    ),
    Case(
        "run with malformed YAML",
        lambda r: ["run", str(r / "s.yaml"), "--out", str(r / "o")],
        lambda r: write_yaml(r / "s.yaml", "name: [unclosed\n"),
    ),
    # report ---------------------------------------------------------------------------
    Case("report missing dir", lambda r: ["report", str(r / "nope")]),
    Case(
        "report corrupt step.json",
        lambda r: ["report", str(r / "exp")],
        lambda r: experiment_dir(r, '{"kind": "train", "meta"'),
        "step.json",
    ),
    Case(
        "report step.json of the wrong shape",
        lambda r: ["report", str(r / "exp")],
        lambda r: experiment_dir(r, "[1, 2, 3]"),
        "step.json",
    ),
    Case(
        "report step.json with a cell's accuracy as text",
        lambda r: ["report", str(r / "exp")],
        lambda r: experiment_dir(
            r,
            json.dumps(
                {
                    "kind": "train",
                    "name": "train/lsp/none/fast-resnet",
                    "meta": {"row": "lsp", "column": "none", "classifier": "fast-resnet"},
                    "result": {"accuracy": "0.9"},
                }
            ),
        ),
        "result.accuracy",
    ),
    Case(
        "report corrupt run.json",
        lambda r: ["report", str(r / "exp")],
        lambda r: experiment_dir(r, None, run_json='{"spec": 3}'),
        "run.json",
    ),
    Case(
        "report --spec into a folder of the user's",
        lambda r: ["report", str(r / "mine"), "--spec", "demo"],
        lambda r: (r / "mine").mkdir() or (r / "mine" / "results.md").write_text("mine"),
        "no store/",
    ),
    Case(
        "report --spec into a missing folder",
        lambda r: ["report", str(r / "typo"), "--spec", "demo"],
        expect="no store/",
    ),
    # sweep ----------------------------------------------------------------------------
    Case(
        "sweep into a folder of the user's",
        lambda r: ["sweep", "demo", "--out", str(r / "mine")],
        lambda r: (r / "mine").mkdir() or (r / "mine" / "trials.csv").write_text("mine"),
        "holds no sweep",
    ),
    Case(
        "sweep --resume where no sweep ran",
        lambda r: ["sweep", "demo", "--out", str(r / "good"), "--resume"],
        expect="--resume: ",
    ),
    # analyze --------------------------------------------------------------------------
    Case(
        "detect with a purification config that is no config",
        lambda r: ["analyze", "detect", "--data", str(r / "good"), "--purified", str(r / "p")],
        lambda r: (purification_dir(r, b"x\n"), (r / "p" / "config.json").write_text("[3]")),
        expect="config.json: not a purification config",
    ),
    Case(
        "detect with a purification of another dataset",
        lambda r: ["analyze", "detect", "--data", str(r / "good"), "--purified", str(r / "p")],
        lambda r: (
            purification_dir(r, b"x\n"),
            __import__("raypurify.atomic").atomic.mark(r / "p", what={"input": "0" * 64}),
        ),
        expect="made from another dataset than --data",
    ),
    Case(
        "detect with missing input",
        lambda r: ["analyze", "detect", "--data", str(r / "nope"), "--purified", str(r / "p")],
    ),
    Case(
        "detect with a folder that is no purification",
        lambda r: ["analyze", "detect", "--data", str(r / "good"), "--purified", str(r / "good")],
        expect="purify",
    ),
    *[
        Case(
            f"detect with {what} stage1.pt",
            lambda r: ["analyze", "detect", "--data", str(r / "good"), "--purified", str(r / "p")],
            lambda r, weights=weights: purification_dir(r, weights),
            expect=expect,
        )
        for what, weights, expect in [
            ("garbage", b"x\n", "stage1.pt: not weights"),
            ("a pickled", pickle.dumps(Evil()), "never loaded"),
            ("a tensor as", torch.zeros(3), "not a state dict"),
            ("another network's", {"encoder.weight": torch.zeros(3)}, "stage1.pt: not weights"),
        ]
    ],
]


def purification_dir(root: Path, weights) -> None:
    """A `raypurify purify` output whose stage-1 weights are `weights` (bytes or a value)."""
    from raypurify.defenses.dvae.config import preset

    p = root / "p"
    p.mkdir()
    (p / "config.json").write_text(json.dumps(preset("cpu").to_dict()))
    if isinstance(weights, bytes):
        (p / "stage1.pt").write_bytes(weights)
    else:
        torch.save(weights, p / "stage1.pt")


def ray_starts(monkeypatch) -> list[str]:
    """Calls of `runtime.init_ray` (which asks Ray whether it is up first), recorded even
    when another test of the session has started Ray already."""
    import inspect

    import ray

    calls, real = [], ray.is_initialized

    def is_initialized():
        caller = inspect.stack()[1]
        if caller.function == "init_ray":
            calls.append(caller.filename)
        return real()

    monkeypatch.setattr(ray, "is_initialized", is_initialized)
    return calls


def terminal_lines(text: str) -> list[str]:
    """What a terminal shows: a progress bar redrawn with carriage returns is one line, and
    one cleared at the end (spaces) is none."""
    shown = (line.rsplit("\r", 1)[-1].strip() for line in text.split("\n"))
    return [line for line in shown if line]


def listing(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def good_template(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("template") / "good"
    write_images(small_set(), d)
    return d


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line(case, good_template, tmp_path, monkeypatch, capsys, recwarn):
    root = tmp_path / "work"
    root.mkdir()
    shutil.copytree(good_template, root / "good")
    np.save(root / "d.npy", np.zeros((30, 3, 8, 8), np.float32))
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    case.setup(root)
    before = listing(root)
    capsys.readouterr()
    starts = ray_starts(monkeypatch)

    code = main(case.argv(root))

    out, err = capsys.readouterr()
    lines = terminal_lines(err)
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not [str(w.message) for w in recwarn]  # nor a warning beside it
    assert "Traceback" not in err + out and "pickle executed" not in out
    assert "weights_only=False" not in err
    assert case.expect in lines[0]
    assert listing(root) == before, "the command left files behind or changed them"
    assert not starts, "Ray was started (or joined) before the input was checked"


def test_bad_input_on_the_real_terminal(tmp_path):
    """The installed entry point: exit 2, one line on stderr, no traceback."""
    d = tmp_path / "good"
    write_images(small_set(), d)
    edit_manifest(d, files=["../../etc/passwd"])
    proc = subprocess.run(
        [sys.executable, "-m", "raypurify", "datasets", "show", str(d)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a plain name" in lines[0], proc.stderr


def test_a_sparse_tensor_import_is_one_line_on_the_terminal(tmp_path):
    """torch warns on stderr as it checks a sparse tensor it loads; the user sees one line."""
    write_images(small_set(), tmp_path / "good")
    torch.save(torch.zeros(30, 3, 8, 8).to_sparse(), tmp_path / "sparse.pt")
    argv = poison_import("perturbation", "sparse.pt")(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "raypurify", *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sparse" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupt_bytes_are_found_in_a_legacy_dataset_too(tmp_path):
    """Without per-file hashes, a corrupt page is still one line when the rows are read."""
    from raypurify.data.interchange import read_images
    from raypurify.errors import DatasetError

    d = tmp_path / "good"
    write_images(small_set(), d)
    legacy(d)
    corrupt_middle(d / "part-00000.parquet")
    with pytest.raises(DatasetError) as e:
        read_images(d)
    assert len(str(e.value).splitlines()) == 1 and "part-00000.parquet" in str(e.value)
    assert pq.ParquetFile(d / "part-00000.parquet").metadata.num_rows == 30


def test_ray_starts_records_init_ray(monkeypatch):
    """The control for the table's last check: a call of init_ray is seen."""
    import ray

    from raypurify.runtime import init_ray

    starts = ray_starts(monkeypatch)
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: None)  # record, never start
    monkeypatch.setenv("RAYPURIFY_RAY_ALL_INTERFACES", "1")
    init_ray()
    assert starts
