"""Typed config sections on pydantic v2, and the YAML + `key=value` loader.

Why pydantic: it is the most used typed-model library in Python, it validates nested models with
`Literal` choices and numeric constraints declared on the fields (`Field(ge=1)`), reports every
error with its location, and reads each field's docstring as its description
(`use_attribute_docstrings`), so the doc sits under the field and `stepdapo config show` prints it.
(tyro and draccus build CLIs from dataclasses; we need YAML files with line numbers in the errors
and `key=value` overrides on top, which neither does better than a small loader over pydantic.)

This module knows nothing about stages or tasks: `config.py` (the run) and the task modules (their
own sections) build on `Section`. Errors name the file, the line and the dotted key:

    configs/arithmetic.yaml:12: actor.lr: expected a number (got 'fast')
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from stepdapo.errors import ConfigError

S = TypeVar("S", bound="Section")


class Section(BaseModel):
    """Base of every config section: strict types (no "3" for 3, no 1.0 for an int, no 1 for
    true), unknown keys are errors (a typo must never train a different model than the one asked
    for), no inf/nan, and each field's docstring is its description."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True,
                              validate_assignment=True, validate_default=True)


def bounded_by(other: str, at_most: bool = True):
    """A field validator: the field must be <= (or >=) the earlier field `other`; a falsy `other`
    (0 or null: the feature is off) imposes nothing. Use: `_k = bounded_by("samples")` in the class
    body, with the field named in `field_validator`: see config.py."""
    def check(cls, v, info):
        bound = info.data.get(other)
        if bound and (v > bound if at_most else v < bound):
            raise ValueError(f"must be {'<=' if at_most else '>='} {other} ({bound})")
        return v
    return classmethod(check)


# ----------------------------------------------------------------------------------------------
# YAML with line numbers
# ----------------------------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 wants a dot: `1.0e-3`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str, source: str) -> tuple[dict, dict[str, int]]:
    """Parse YAML into plain data and the line of every dotted key; duplicate keys are errors."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None
    lines: dict[str, int] = {}
    if node is None:
        return {}, lines
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{source}:{node.start_mark.line + 1}: the top level must be a mapping of keys")

    def walk(n: yaml.Node, prefix: str) -> Any:
        if isinstance(n, yaml.MappingNode):
            out = {}
            for k, v in n.value:
                key = prefix + str(k.value)
                if str(k.value) in out:
                    raise ConfigError(f"{source}:{k.start_mark.line + 1}: duplicate key {key!r} "
                                      f"(first at line {lines[key]})")
                lines[key] = k.start_mark.line + 1
                out[str(k.value)] = walk(v, key + ".")
            return out
        return yaml.load(yaml.serialize(n), Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader

    return walk(node, ""), lines


def parse_override(text: str) -> tuple[str, Any]:
    """`actor.lr=1e-4` -> ("actor.lr", 1e-4); values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(p == "" for p in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() != "" else ""  # noqa: S506
    except yaml.YAMLError:
        value = raw
    return key, value


def _set_dotted(data: dict, key: str, value: Any) -> None:
    cur = data
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(cur.get(p), dict):
            cur[p] = {}  # a scalar here is replaced; validation then says what the key must be
        cur = cur[p]
    cur[parts[-1]] = value


# ----------------------------------------------------------------------------------------------
# Validation errors in the user's words
# ----------------------------------------------------------------------------------------------

def _section_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The section class at the dotted path `loc` (None if `loc` leads elsewhere)."""
    for part in loc:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        sub = getattr(info, "annotation", None)
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return None
        model = sub
    return model


def _bounds(info) -> str | None:
    """The numeric constraint of a field as one phrase: 'must be in [0, 1]', 'must be > 0'."""
    b = {}
    for m in getattr(info, "metadata", []):
        for name in ("gt", "ge", "lt", "le"):
            if getattr(m, name, None) is not None:
                b[name] = getattr(m, name)
    b = {k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in b.items()}
    lo = ("(", b["gt"]) if "gt" in b else ("[", b["ge"]) if "ge" in b else None
    hi = (")", b["lt"]) if "lt" in b else ("]", b["le"]) if "le" in b else None
    if lo and hi:
        return f"must be in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f"must be {'>' if lo[0] == '(' else '>='} {lo[1]}"
    if hi:
        return f"must be {'<' if hi[0] == ')' else '<='} {hi[1]}"
    return None


_TYPE_WORDS = {"int_type": "expected an integer", "int_from_float": "expected an integer",
               "float_type": "expected a number", "float_parsing": "expected a number",
               "bool_type": "expected true/false", "string_type": "expected a string",
               "list_type": "expected a list", "model_type": "must be a mapping",
               "dict_type": "must be a mapping", "finite_number": "must be a finite number"}


def _message(model: type[BaseModel], loc: tuple, err: dict) -> str:
    parent = _section_at(model, loc[:-1])
    info = parent.model_fields.get(loc[-1]) if parent is not None and loc else None
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        known = f" (known here: {', '.join(sorted(parent.model_fields))})" if parent is not None else ""
        return f"unknown key {'.'.join(map(str, loc))!r}{known}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        text = _bounds(info) or err["msg"]
    elif kind in _TYPE_WORDS:
        text = _TYPE_WORDS[kind]
    elif kind == "literal_error":
        text = f"must be one of {err['ctx']['expected']}"
    elif kind == "value_error":
        text = str(err["ctx"]["error"])
    else:
        text = err["msg"][0].lower() + err["msg"][1:]
    return f"{text} (got {value!r})"


def _raise(model: type[BaseModel], e: ValidationError, where_of) -> None:
    lines = []
    for err in e.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        dotted = ".".join(str(p) for p in loc)
        lines.append(f"{where_of(dotted)}: {dotted}: {_message(model, loc, err)}")
    raise ConfigError("\n".join(lines)) from None


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

def load(model: type[S], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> S:
    """defaults <- YAML file <- `key=value` overrides, validated in one go."""
    data: dict = {}
    lines: dict[str, int] = {}
    source = "<defaults>"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.exists():
            raise ConfigError(f"config file not found: {p}")
        if not p.is_file():
            raise ConfigError(f"{p}: a config must be a YAML file, not a directory")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
        data, lines = parse_yaml(text, source)
        if not data:
            raise ConfigError(f"{p}: the config file is empty; give at least one key (the defaults are "
                              f"`stepdapo config show`), or run with configs/arithmetic.yaml")
    origin_of: dict[str, str] = {}
    for ov in overrides:
        key, value = parse_override(ov)
        origin_of[key] = f"override {ov!r}"
        _set_dotted(data, key, value)

    def where_of(dotted: str) -> str:
        for k in [dotted] + [dotted.rsplit(".", i)[0] for i in range(1, dotted.count(".") + 1)]:
            if k in origin_of:
                return origin_of[k]
        return f"{source}:{lines[dotted]}" if dotted in lines else source

    try:
        return model.model_validate(data)
    except ValidationError as e:
        _raise(model, e, where_of)


def from_dict(model: type[S], data: dict, source: str = "<saved config>") -> S:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        _raise(model, e, lambda _: source)


def describe(cfg: BaseModel, width: int = 100) -> str:
    """The resolved config as YAML, each key preceded by its documentation as comments."""
    out: list[str] = []

    def comment(text: str, indent: str) -> None:
        for para in re.split(r"\n\s*\n", (text or "").strip()):  # docstring lines re-flowed
            for line in textwrap.wrap(" ".join(para.split()), width - len(indent) - 2) or [""]:
                out.append(f"{indent}# {line}".rstrip())

    def walk(obj: BaseModel, indent: str) -> None:
        for name, info in type(obj).model_fields.items():
            value = getattr(obj, name)
            comment(info.description or "", indent)
            if isinstance(value, BaseModel):
                out.append(f"{indent}{name}:")
                walk(value, indent + "  ")
            else:
                dumped = yaml.safe_dump({name: value}, default_flow_style=True, width=10**6).strip()
                out.append(f"{indent}{dumped.removeprefix('{').removesuffix('}')}")
            if not indent:
                out.append("")

    walk(cfg, "")
    return "\n".join(out).rstrip() + "\n"
