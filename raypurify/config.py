"""Typed configs: pydantic models loaded from YAML, with `--set key.path=value` overrides.

Every config model rejects unknown keys and wrong types; errors carry the dotted key path
(``train.epochs: Input should be a valid integer``) so a user can find the offending line,
and an unknown key names the one meant or the keys known there.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_serializer

from raypurify.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import SerializerFunctionWrapHandler


class Config(BaseModel):
    """Base for all configs: strict about keys, validated on assignment too."""

    # ser_json_inf_nan: keep inf as a float in to_dict (with a model_serializer in place,
    # pydantic's default would write None, which does not validate back).
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        protected_namespaces=(),
        ser_json_inf_nan="constants",
    )
    # Fields added after results were stored under content keys: left out of dumps while at
    # their default (which keeps the old behaviour), so adding a knob neither changes a
    # stored step's key nor its meaning; loading fills the default back in.
    added_fields: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_added_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in self.added_fields:
            if getattr(self, name) == type(self).model_fields[name].default:
                data.pop(name, None)
        return data

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A stable hash of the config's content (key order does not matter)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], value), the value parsed as YAML."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({e.problem})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of `data` with each ``key.path=value`` override set.

    Missing sections are created; a numeric part indexes into a list
    (``classifiers.0.recipe=paper``).
    """
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for i, part in enumerate(path):
            where = ".".join(path[: i + 1])
            last = i == len(path) - 1
            key: int | str
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {'.'.join(path)}: '{where}' is not an item")
                key = int(part)
            elif isinstance(node, dict):
                key = part
                if not last and node.get(key) is None:
                    node[key] = {}
            else:
                raise ConfigError(f"--set {'.'.join(path)}: '{where}' is inside a value")
            if last:
                node[key] = value
            else:
                node = node[key]
                if not isinstance(node, (dict, list)):
                    raise ConfigError(
                        f"--set {'.'.join(path)}: '{where}' is a value, not a section"
                    )
    return out


def format_validation_error(
    err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> str:
    """One line: ``key.path: message (got value)`` for each problem, joined with '; '.
    Given the `model` validated, an unknown key says which key was meant, or which exist."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in [prefix, *e["loc"]] if p != "")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + known_keys_hint(model, e["loc"])
        elif e["type"] == "value_error":  # our validators' own words, which name the field
            msg = str(e["ctx"]["error"])
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def known_keys_hint(model: type[BaseModel] | None, loc: tuple[int | str, ...]) -> str:
    """`` (did you mean 'ratio'?)`` or `` (known: a, b)`` for the unknown key at `loc` of
    `model`, or nothing where the keys there are not a model's fields."""
    node: Any = model
    for part in loc[:-1]:
        node = _section(node, part)
    node = _bare(node)
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return ""
    keys = [f.alias or name for name, f in node.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(keys)})"


def _bare(node: Any) -> Any:
    """X for Optional[X]; None for another union (its member is not known here)."""
    if get_origin(node) in (Union, types.UnionType):
        inner = [a for a in get_args(node) if a is not type(None)]
        return inner[0] if len(inner) == 1 else None
    return node


def _section(node: Any, part: int | str) -> Any:
    """The type found at `part` under the type `node` (a model's field, a list's or a
    dict's item), None where there is none to follow."""
    node = _bare(node)
    origin = get_origin(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        fields = {f.alias or name: f for name, f in node.model_fields.items()}
        return fields[part].annotation if part in fields else None
    if origin in (list, tuple) and isinstance(part, int):
        return get_args(node)[0]
    if origin is dict:
        return get_args(node)[1]
    return None


def validate(
    model: type[C],
    data: Mapping[str, Any],
    *,
    source: str = "config",
    overrides: Iterable[str] = (),
) -> C:
    """Validate plain data into `model`, raising a one-line ConfigError on failure. The
    error names `source` and, when one wrote the first failing key, the `--set` item: a
    user who typed the bad value is pointed at their command, not only at the file."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as e:
        typed = set_by(e, overrides)
        where = f"{source}, {typed}" if typed else source
        raise ConfigError(f"{where}: {format_validation_error(e, model=model)}") from None


def set_by(err: ValidationError, overrides: Iterable[str]) -> str | None:
    """`--set KEY=VALUE` for the override whose key is, contains or lies under the first
    failing field (`seed=abc` for `seed`, `nosuch.key=1` for the unknown `nosuch`)."""
    first = ".".join(str(p) for p in err.errors()[0]["loc"])
    for item in overrides:
        key = ".".join(parse_override(item)[0])
        if first == key or first.startswith(key + ".") or key.startswith(first + "."):
            return f"--set {item}"
    return None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def named_or_file(name_or_path: str, shipped: Mapping[str, Path], what: str) -> Path:
    """A YAML file's path, or the path of the shipped `what` (preset, space) of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if name_or_path not in shipped:
        raise ConfigError(
            f"'{name_or_path}' is neither a YAML file nor a shipped {what} "
            f"({what}s: {', '.join(shipped) or 'none found'})"
        )
    return shipped[name_or_path]


def load(
    model: type[C],
    base: Mapping[str, Any] | str | Path | None = None,
    overrides: Iterable[str] = (),
    *,
    source: str | None = None,
) -> C:
    """Build a config from a YAML file or dict, apply `--set` overrides, then validate
    (errors name `source`: the file, else the key the dict came from)."""
    source = source or (str(base) if isinstance(base, (str, Path)) else "config")
    data = read_yaml(base) if isinstance(base, (str, Path)) else dict(base or {})
    return validate(model, apply_overrides(data, overrides), source=source, overrides=overrides)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys (MLflow params are flat)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
