"""Job configs: a YAML file read into nested dataclasses, with `--set key.sub=value` overrides.

The dataclasses are pydantic dataclasses (`config_dataclass`): every value is checked against its
field's type and range whenever a config is built, from YAML or in code, before any cluster work.
An unknown key, a value of the wrong type or out of range, or malformed YAML is a `ConfigError` that
names the file and the key path (e.g. `optim.grad_accum`), not a silently ignored typo or a crash
inside a worker. Numbers written as strings (YAML reads `1e-4` as one) are taken as numbers.
"""

import dataclasses
import functools
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import pydantic
import yaml

T = TypeVar("T")

# Ranges shared by several configs (pydantic's PositiveInt, NonNegativeInt, ... cover the rest).
Probability = Annotated[float, pydantic.Field(ge=0.0, le=1.0)]
HeldOutFraction = Annotated[float, pydantic.Field(ge=0.0, lt=1.0)]  # 1 would leave nothing to train on
# The t values of a validation grid (0 = clean latents, 1 = pure noise); at least one.
NoiseLevels = Annotated[tuple[Annotated[float, pydantic.Field(ge=0.0, le=1.0)], ...], pydantic.Field(min_length=1)]

# extra="forbid": an unknown key is an error, not a typo silently ignored. Numbers are accepted for
# text fields (a run name such as 2024), numeric strings for numeric fields (pydantic's lax mode).
_PYDANTIC_CONFIG = pydantic.ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class ConfigError(ValueError):
    """A config file or override that does not fit the job's config."""


def config_dataclass(cls: type[T]) -> type[T]:
    """`@dataclasses.dataclass`, validated by pydantic: the fields' types (with `Annotated` ranges)
    are checked whenever an instance is built, then `__post_init__` runs for checks across fields.
    Building one in code with a bad value raises a one-line ConfigError (a ValueError)."""
    cls = pydantic.dataclasses.dataclass(cls, config=_PYDANTIC_CONFIG)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except pydantic.ValidationError as err:
            raise ConfigError(describe(err, type(self).__name__, type(self))) from None

    cls.__init__ = __init__
    return cls


def _dataclass_in(hint: Any) -> Any:
    """The dataclass a type hint holds (through Optional, Annotated and dict values), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _dataclass_in(args[0])
    if origin in (typing.Union, types.UnionType):
        return next((d for d in map(_dataclass_in, args) if d is not None), None)
    if origin is dict and len(args) == 2:
        return _dataclass_in(args[1])
    return None


def _known_keys(cls: Any, path: tuple) -> list[str] | None:
    """The field names of the section at `path` under `cls`: what an unknown key could have meant."""
    hint = cls
    for part in path:
        section = _dataclass_in(hint)
        if section is None:
            return None
        hints = typing.get_type_hints(section)
        if part in hints:
            hint = hints[part]
        elif not isinstance(part, str) or typing.get_origin(hint) is not dict:
            hint = None
    section = _dataclass_in(hint)
    return sorted(f.name for f in dataclasses.fields(section)) if section is not None else None


def _key_path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".")


def describe(err: pydantic.ValidationError, where: str, cls: Any = None) -> str:
    """One line for all of a validation's errors: `where: key.path: what is wrong (got value)`."""
    problems = []
    for e in err.errors(include_url=False):
        if e["loc"] and isinstance(e["loc"][0], int) and dataclasses.is_dataclass(cls):  # a positional argument
            e["loc"] = (dataclasses.fields(cls)[e["loc"][0]].name, *e["loc"][1:])
        key = _key_path(e["loc"])
        if e["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            known = _known_keys(cls, e["loc"][:-1]) if cls is not None else None
            text = f"unknown key {e['loc'][-1]!r}" + (f" (known keys: {', '.join(known)})" if known else "")
            key = _key_path(e["loc"][:-1])
        elif e["type"] in ("value_error", "assertion_error"):  # raised by a __post_init__: its own message
            text = str(e["ctx"]["error"])
        elif e["type"] in ("missing", "missing_argument"):
            text = "is required"
        else:
            text = f"{e['msg']} (got {e['input']!r})"
        problems.append(f"{key}: {text}" if key else text)
    return f"{where}: " + "; ".join(problems)


def from_dict(cls: type[T], values: dict, where: str = "config") -> T:
    """Builds dataclass `cls` from a mapping, recursively; unknown keys are errors."""
    try:
        return pydantic.TypeAdapter(cls).validate_python(values)
    except pydantic.ValidationError as err:
        raise ConfigError(describe(err, where, cls)) from None


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (yaml's own text spans several lines)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML: numbers, booleans, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        return path, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(err)}); "
                          f"quote it, e.g. {key}='\"...\"'") from None


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """The config of `cls`: its defaults, updated by the YAML file, updated by the overrides."""
    values: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config file at {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        values, where = loaded, str(path)
    for text in overrides:
        keys, value = parse_override(text)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return from_dict(cls, values, where)

