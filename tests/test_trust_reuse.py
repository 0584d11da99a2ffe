"""Single-step commands reuse or resume an output only when it was made from the same input
content and the same settings; anything else is refused with one line saying what differs.

Real Ray Train runs on tiny synthetic sets: one classifier training behind JPEG and one
two-stage purification, each then asked to continue with another input or setting.
"""

from __future__ import annotations

import json
import shutil

import pytest

from raypurify.atomic import MARKER
from raypurify.data.interchange import open_dataset, write_images
from raypurify.data.registry import load
from raypurify.data.spec import DatasetSpec
from raypurify.defenses.dvae.config import preset
from raypurify.defenses.dvae.pipeline import purify
from raypurify.errors import RaypurifyError
from raypurify.training.run import run_training

FAST = ["epochs=1", "arch_options.width=8", "batch_size=32", "eval_subset=null"]
TINY = [
    "model.width=8",
    "model.latent=16",
    "stage1.epochs=1",
    "stage2.epochs=1",
    "stage1.batch_size=32",
    "stage2.batch_size=32",
    "infer_batch_size=64",
]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")

    def make(name, seed, split="train", rows=96):
        spec = DatasetSpec(name="synthetic", rows=rows, size=16, classes=4, seed=seed, split=split)
        return write_images(load(spec), root / name).path

    return {"a": make("a", 0), "b": make("b", 1), "test": make("test", 2, "test", 64)}


def train(sets, out, data="a", extra=(), **kw):
    return run_training(
        str(sets[data]),
        str(sets["test"]),
        out,
        recipe_name="cpu",
        defense=kw.pop("defense", "jpeg"),
        overrides=[*FAST, *extra],
        **kw,
    )


def test_train_reuses_only_the_same_run(ray_session, warm_fits, mlflow_uri, sets, tmp_path):
    out = tmp_path / "run"
    first = train(sets, out)
    defended = open_dataset(out / "defended")
    made_from = json.loads((out / MARKER).read_text())["what"]["data"]
    assert made_from["sha256"] == open_dataset(sets["a"]).sha256

    # Another training set, learning rate, epoch count or defence: refused, nothing changed.
    before = (out / "metrics.json").read_text()
    for kwargs, differs in [
        ({"data": "b"}, "data.sha256"),
        ({"extra": ["optim.lr=0.05"]}, "config.optim.lr"),
        ({"extra": ["epochs=2"]}, "config.epochs"),
        ({"defense": "grayscale"}, "config.defense.name"),
    ]:
        with pytest.raises(RaypurifyError) as e:
            train(sets, out, **kwargs)
        message = str(e.value)
        assert len(message.splitlines()) == 1
        assert differs in message and "--overwrite" in message and "another --out" in message
    assert (out / "metrics.json").read_text() == before
    assert open_dataset(out / "defended").sha256 == defended.sha256

    # The same command resumes the finished run: the same model, nothing retrained.
    again = train(sets, out)
    assert again["accuracy"] == first["accuracy"] and again["epochs"] == first["epochs"]

    # --overwrite replaces our own run: the defended set is rebuilt from the new input.
    train(sets, out, data="b", overwrite=True)
    assert open_dataset(out / "defended").manifest["parents"] == [{"source": str(sets["b"])}]
    assert open_dataset(out / "defended").sha256 != defended.sha256
    made_from = json.loads((out / MARKER).read_text())["what"]["data"]
    assert made_from["sha256"] == open_dataset(sets["b"]).sha256


def test_purify_reuses_only_the_same_input_and_config(
    ray_session, warm_fits, mlflow_uri, sets, tmp_path, monkeypatch
):
    out = tmp_path / "purified"
    cfg = preset("cpu", TINY)
    summary = purify(sets["a"], out, cfg)
    stamp = (out / "p3" / "manifest.json").stat().st_mtime_ns
    # `analyze`'s check before Ray accepts the weights a purification wrote
    from raypurify.defenses.dvae.stage import check_weights

    check_weights(out / "stage1.pt", cfg, 4, 16)

    # Another input: the old summary is not returned.
    with pytest.raises(RaypurifyError) as e:
        purify(sets["b"], out, cfg)
    assert "input" in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(RaypurifyError, match="another config"):
        purify(sets["a"], out, preset("cpu", [*TINY, "seed=1"]))
    # RAYPURIFY_PRECISION is `--set precision=...` for a config left at auto: a result
    # made in fp32 (the tests' setting) is not reused when bf16 is asked for.
    with monkeypatch.context() as env:
        env.setenv("RAYPURIFY_PRECISION", "bf16")
        with pytest.raises(RaypurifyError, match='precision: "fp32" -> "bf16"'):
            purify(sets["a"], out, preset("cpu", TINY))
    assert purify(sets["a"], out, cfg) == summary
    assert (out / "p3" / "manifest.json").stat().st_mtime_ns == stamp

    # A copy (or a move) of OUT names its own outputs, not the ones its summary was written
    # with; one whose P3 is gone or replaced makes it again from the stages' checkpoints
    # (the same to the bit), instead of returning the old summary.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    reused = purify(sets["a"], copy, cfg)
    assert {reused["output"], *(o["path"] for o in reused["outputs"].values())} == {
        str(copy / p) for p in ("p1", "p2", "p3")
    }
    shutil.rmtree(copy / "p3")
    shutil.copytree(copy / "p1", copy / "p3")  # another dataset where P3 was
    again = purify(sets["a"], copy, cfg)
    assert again["output"] == str(copy / "p3")
    assert open_dataset(copy / "p3").sha256 == summary["outputs"]["p3"]["sha256"]
    assert again["passes"]["p1"].get("reused") and not again["passes"]["p2_p3"].get("reused")

    # An output written before the marker is adopted only for its own input and config.
    (out / MARKER).unlink()
    with pytest.raises(RaypurifyError, match="not written by"):
        purify(sets["b"], out, cfg)
    assert not (out / MARKER).exists()
    assert purify(sets["a"], out, cfg) == summary
    assert (out / MARKER).exists()
    # One that never finished records no input (no summary.json): it is never adopted, not
    # even for the input it may have come from, and its passes are not reused.
    (out / MARKER).unlink()
    (out / "summary.json").unlink()
    for data in ("b", "a"):
        with pytest.raises(RaypurifyError, match="not written by"):
            purify(sets[data], out, cfg)
    assert not (out / MARKER).exists()


def test_disentangle_refuses_an_out_made_from_other_inputs(sets, tmp_path, capsys):
    """`analyze disentangle` takes only the clean set its --data was poisoned from, and
    `--out DIR` resumes its training only for the same clean set, poisoned set,
    purification and recipe (no Ray needed to see either refusal)."""
    from raypurify.atomic import mark
    from raypurify.cli import main

    purified = tmp_path / "purified"
    purified.mkdir()
    import torch

    from raypurify.defenses.dvae.stage import build

    cfg = preset("cpu", TINY)
    (purified / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.save(build(cfg, 4, 16).state_dict(), purified / "stage1.pt")  # the sets' classes, px
    out = tmp_path / "dis"
    out.mkdir()
    mark(out, what={"clean": {"id": "another clean set"}})
    rest = ["--purified", str(purified), "--test", str(sets["test"]), "--out", str(out)]
    # A clean set that is not --data's base (other labels at the same rows) is refused first.
    unrelated = ["analyze", "disentangle", "--clean", str(sets["a"]), "--data", str(sets["b"])]
    assert main([*unrelated, *rest]) == 2
    err = capsys.readouterr().err
    assert f"--clean {sets['a']}: not the clean set --data {sets['b']} was poisoned from" in err
    assert "0 of its 96 rows missing" in err and len(err.splitlines()) == 1
    # (a set is its own base: the same rows and labels)
    argv = ["analyze", "disentangle", "--clean", str(sets["a"]), "--data", str(sets["a"]), *rest]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "another config or input" in err and "clean" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [MARKER]
    # The way on that the message names exists: --overwrite may replace the other run.
    from raypurify.atomic import check_claim
    from raypurify.cli import build_parser

    assert build_parser().parse_args([*argv, "--overwrite"]).overwrite
    assert check_claim(out, {"clean": {"id": "this one"}}, overwrite=True) == "replace"
