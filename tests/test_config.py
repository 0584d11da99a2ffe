"""Typed configs: strict keys and types with dotted key paths, `--set` overrides, flatten."""

from __future__ import annotations

import pydantic
import pytest
from pydantic import model_validator

from raypurify import config
from raypurify.config import Config, apply_overrides, flatten, parse_override
from raypurify.errors import ConfigError


class Optim(Config):
    lr: float = 0.1
    betas: list[float] = [0.9, 0.999]


class Train(Config):
    epochs: int = 1
    amp: bool = False
    optim: Optim = Optim()


class Experiment(Config):
    name: str = "demo"
    tags: list[str] = []
    train: Train = Train()


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_defaults_validate():
    exp = config.validate(Experiment, {})
    assert exp.train.optim.lr == 0.1
    assert exp.to_dict() == {
        "name": "demo",
        "tags": [],
        "train": {"epochs": 1, "amp": False, "optim": {"lr": 0.1, "betas": [0.9, 0.999]}},
    }


@pytest.mark.parametrize(
    "data, path, hint",
    [
        ({"nmae": "x"}, "nmae", "did you mean 'name'?"),
        ({"train": {"epochz": 3}}, "train.epochz", "did you mean 'epochs'?"),
        ({"train": {"optim": {"momentum": 0.9}}}, "train.optim.momentum", "known: lr, betas"),
    ],
)
def test_unknown_keys_rejected_with_key_path_and_the_keys_known_there(data, path, hint):
    assert error_of(config.validate, Experiment, data, source="exp.yaml") == (
        f"exp.yaml: {path}: unknown key ({hint})"
    )


def test_wrong_types_rejected_with_key_path():
    msg = error_of(config.validate, Experiment, {"train": {"epochs": "many"}})
    assert msg.startswith("config: train.epochs: Input should be a valid integer")
    assert msg.endswith("(got 'many')")

    msg = error_of(config.validate, Experiment, {"train": {"optim": {"lr": "fast"}}})
    assert msg.startswith("config: train.optim.lr: Input should be a valid number")

    msg = error_of(config.validate, Experiment, {"train": {"optim": {"betas": [0.9, "x"]}}})
    assert msg.startswith("config: train.optim.betas.1: ")

    msg = error_of(config.validate, Experiment, {"train": 5})
    assert msg.startswith("config: train: ")


class Window(Config):
    low: int = 0
    high: int = 1

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.low >= self.high:
            raise ValueError("high: must be above low")
        return self


class Plot(Config):
    window: Window = Window()


def test_a_validators_own_words_name_the_field_without_pydantic_noise():
    # A whole-config check at the top says only its message; a nested one gets its path.
    assert error_of(config.validate, Window, {"low": 3}) == "config: high: must be above low"
    msg = error_of(config.validate, Plot, {"window": {"low": 3}}, source="plot.yaml")
    assert msg == "plot.yaml: window: high: must be above low"


def test_several_problems_are_joined_on_one_line():
    msg = error_of(config.validate, Experiment, {"train": {"epochs": "x", "bogus": 1}, "z": 2})
    parts = msg.removeprefix("config: ").split("; ")
    assert len(parts) == 3
    assert {p.split(":")[0] for p in parts} == {"train.epochs", "train.bogus", "z"}


def test_assignment_is_validated_too():
    exp = Experiment()
    with pytest.raises(pydantic.ValidationError):
        exp.train.epochs = "lots"
    exp.train.epochs = 4
    assert exp.train.epochs == 4


def test_overrides_parse_yaml_values(tmp_path):
    base = tmp_path / "exp.yaml"
    base.write_text("name: base\ntrain:\n  epochs: 2\n  optim:\n    lr: 0.5\n")
    exp = config.load(
        Experiment,
        base,
        [
            "train.epochs=3",
            "train.optim.lr=0.01",
            "train.amp=true",
            "train.optim.betas=[0.5, 0.75]",
            "tags=[fast, small]",
            "name=hello world",
        ],
    )
    assert exp.train.epochs == 3 and type(exp.train.epochs) is int
    assert exp.train.optim.lr == 0.01
    assert exp.train.amp is True
    assert exp.train.optim.betas == [0.5, 0.75]
    assert exp.tags == ["fast", "small"]
    assert exp.name == "hello world"
    # Untouched values come from the file.
    assert config.load(Experiment, base).train.epochs == 2


@pytest.mark.parametrize(
    "item, path, value",
    [
        ("a.b=3", ["a", "b"], 3),
        ("lr=0.25", ["lr"], 0.25),
        ("flag=false", ["flag"], False),
        ("xs=[1, 2, 3]", ["xs"], [1, 2, 3]),
        ("m={k: v}", ["m"], {"k": "v"}),
        ("s=abc", ["s"], "abc"),
        ("s='3'", ["s"], "3"),
        ("s=", ["s"], ""),
        ("s=a=b", ["s"], "a=b"),
        (" a.b =7", ["a", "b"], 7),
    ],
)
def test_parse_override(item, path, value):
    got_path, got = parse_override(item)
    assert got_path == path
    assert got == value and type(got) is type(value)


def test_scientific_notation_reaches_float_fields_as_float():
    exp = config.load(Experiment, {}, ["train.optim.lr=1e-3"])
    assert exp.train.optim.lr == pytest.approx(0.001)
    assert isinstance(exp.train.optim.lr, float)


@pytest.mark.parametrize("item", ["foo", "=3", " =3"])
def test_malformed_override(item):
    msg = error_of(parse_override, item)
    assert msg == f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=5"


def test_override_with_invalid_yaml():
    msg = error_of(parse_override, "tags=[a, b")
    assert msg.startswith("--set tags: value '[a, b' is not valid YAML")


def test_override_into_a_value_is_refused():
    msg = error_of(apply_overrides, {"name": "x"}, ["name.first=y"])
    assert msg == "--set name.first: 'name' is a value, not a section"


def test_apply_overrides_creates_sections_and_copies():
    data = {"train": {"epochs": 1}}
    out = apply_overrides(data, ["train.optim.lr=0.2", "train.epochs=5"])
    assert out == {"train": {"epochs": 5, "optim": {"lr": 0.2}}}
    assert data == {"train": {"epochs": 1}}  # the input is not modified


def test_an_unknown_key_under_a_list_an_optional_or_a_dict_is_matched_to_its_model():
    class Part(Config):
        paths: list[str] = []

    class Whole(Config):
        parts: list[Part] = []
        spare: Part | None = None
        named: dict[str, Part] = {}
        free: dict[str, int] = {}

    data = {"parts": [{}, {"pathz": []}], "spare": {"pathz": []}, "named": {"a": {"pathz": []}}}
    assert error_of(config.validate, Whole, data) == "config: " + "; ".join(
        f"{where}.pathz: unknown key (did you mean 'paths'?)"
        for where in ("parts.1", "spare", "named.a")
    )
    assert error_of(config.validate, Whole, {"free": {"a": "x"}}).startswith("config: free.a: ")


def test_a_bad_override_is_blamed_on_its_set(tmp_path):
    """The `--set` that wrote the failing key is named beside the file (the user typed
    it), the file alone when the file holds the fault."""
    msg = error_of(config.load, Experiment, {}, ["train.optim.lrr=0.1"])
    assert msg == (
        "config, --set train.optim.lrr=0.1: train.optim.lrr: unknown key (did you mean 'lr'?)"
    )
    base = tmp_path / "exp.yaml"
    base.write_text("name: x\n")
    msg = error_of(config.load, Experiment, base, ["name=y", "train.epochs=lots"])
    assert msg.startswith(f"{base}, --set train.epochs=lots: train.epochs: Input should be")
    msg = error_of(config.load, Experiment, base, ["nosuch.deeper=1"])
    assert msg == f"{base}, --set nosuch.deeper=1: nosuch: unknown key (known: name, tags, train)"
    base.write_text("train: {epochs: lots}\n")
    msg = error_of(config.load, Experiment, base, ["name=y", "train.optim.lr=0.1"])
    assert msg.startswith(f"{base}: train.epochs: Input should be a valid integer")


def test_yaml_file_errors(tmp_path):
    assert error_of(config.read_yaml, tmp_path / "missing.yaml") == (
        f"{tmp_path / 'missing.yaml'}: config file not found"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: [1, 2\n")
    assert error_of(config.read_yaml, bad).startswith(f"{bad} line ")
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    assert error_of(config.read_yaml, top) == f"{top}: expected a mapping at the top level"
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert config.read_yaml(empty) == {}


def test_flatten():
    nested = {
        "a": {"b": 1, "c": {"d": [1, 2], "e": None}},
        "empty": {},
        "f": "x",
    }
    assert flatten(nested) == {"a.b": 1, "a.c.d": [1, 2], "a.c.e": None, "empty": {}, "f": "x"}
    assert flatten({}) == {}
    assert flatten({"k": 1}, prefix="p.") == {"p.k": 1}
    assert flatten(Experiment().to_dict())["train.optim.lr"] == 0.1


def test_digest_ignores_key_order_but_not_values():
    a = config.validate(Experiment, {"name": "x", "train": {"epochs": 2, "amp": True}})
    b = config.validate(Experiment, {"train": {"amp": True, "epochs": 2}, "name": "x"})
    c = config.validate(Experiment, {"name": "x", "train": {"epochs": 3, "amp": True}})
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()
    assert len(a.digest()) == 64


class Stored(Config):
    epochs: int = 5


class Extended(Config):
    added_fields = frozenset({"scale"})
    epochs: int = 5
    scale: float = 1.0


class Holder(Config):
    inner: Extended = Extended()


def test_a_field_added_at_its_default_keeps_stored_content_keys():
    assert Extended().digest() == Stored().digest()
    assert Holder().to_dict() == {"inner": {"epochs": 5}}  # nested configs too
    changed = Extended(scale=0.3)
    assert changed.digest() != Stored().digest()
    assert Extended.model_validate(changed.to_dict()) == changed
    assert Extended.model_validate(Extended().to_dict()) == Extended()
    assert Holder(inner=Extended(scale=float("inf"))).to_dict()["inner"]["scale"] == float("inf")
