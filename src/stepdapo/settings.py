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

from stepdapo.errors import ConfigError, StepdapoError, excerpt
from stepdapo.paths import open_input

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


# A config is a few KB of plain keys and values. What YAML can do beyond that is refused or bounded
# before anything is built from it: tags (`!!python/object`: PyYAML's safe loader refuses them,
# with a traceback), aliases that expand exponentially ("billion laughs": a 1 KB file that is
# 10^9 values once expanded), nesting that overflows the recursive composer. Anchors, aliases and
# merge keys (`<<: *base`) are allowed within those bounds: they are how YAML shares settings.
MAX_CONFIG_BYTES = 1 << 20
MAX_DEPTH = 20
MAX_VALUES = 10_000
SAFE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge")}
_MERGE = "tag:yaml.org,2002:merge"


def _check_events(text: str, source: str) -> None:
    """Refuse explicit tags and nesting deeper than MAX_DEPTH, from the event stream (the parser
    keeps a stack, it does not recurse), before the composer builds anything."""
    depth = 0
    try:
        for ev in yaml.parse(text, Loader=_Loader):
            line = f"{source}:{ev.start_mark.line + 1}"
            tag = getattr(ev, "tag", None)
            if tag is not None and tag not in SAFE_TAGS:
                raise ConfigError(f"{line}: YAML tag {excerpt(tag, 80)} is not allowed in a config "
                                  f"(plain values only; quote a value that starts with '!')")
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError(f"{line}: nested more than {MAX_DEPTH} levels deep; a config is "
                                      f"sections of plain keys")
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {excerpt(str(e), 300)}") from None


def _check_size(root: yaml.Node, source: str) -> None:
    """Refuse a document that is more than MAX_VALUES nodes once its aliases are expanded, or whose
    alias refers to a node that contains it (a loop). The size is counted on the composed graph,
    each shared node once, so counting is as cheap as the file is small."""
    size: dict[int, int] = {}
    open_: set[int] = set()  # nodes whose children are still being counted
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # post-order, without recursion
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        kids = [] if isinstance(node, yaml.ScalarNode) else (
            [x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode) else node.value)
        if not children_done:
            open_.add(id(node))
            stack.append((node, True))
            for kid in kids:
                if id(kid) in open_:
                    raise ConfigError(f"{source}:{kid.start_mark.line + 1}: an alias that refers to a node "
                                      f"containing it (a loop)")
                stack.append((kid, False))
            continue
        open_.discard(id(node))
        size[id(node)] = 1 + sum(size[id(k)] for k in kids)
        if size[id(node)] > MAX_VALUES:
            raise ConfigError(f"{source}:{node.start_mark.line + 1}: more than {MAX_VALUES:,} values once "
                              f"its aliases are expanded; a config is a few hundred")


def _compose(text: str, source: str) -> yaml.Node | None:
    _check_events(text, source)
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {excerpt(str(e), 300)}") from None
    if node is not None:
        _check_size(node, source)
    return node


def _scalar_value(node: yaml.Node, source: str) -> Any:
    try:
        return yaml.load(yaml.serialize(node), Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an integer of over 4300 digits
        raise ConfigError(f"{source}:{node.start_mark.line + 1}: {excerpt(str(e), 200)}") from None


def parse_yaml(text: str, source: str) -> tuple[dict, dict[str, int]]:
    """Parse YAML into plain data and the line of every dotted key; duplicate keys are errors.
    Merge keys (`<<: *base`, or a list of aliases) work as in YAML 1.1: the mapping's own keys win,
    then the merged mappings in order."""
    node = _compose(text, source)
    lines: dict[str, int] = {}
    if node is None:
        return {}, lines
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{source}:{node.start_mark.line + 1}: the top level must be a mapping of keys")

    def walk(n: yaml.Node, prefix: str, lines: dict[str, int]) -> Any:
        if not isinstance(n, yaml.MappingNode):
            return _scalar_value(n, source)
        out, merged = {}, []
        for k, v in n.value:
            where = f"{source}:{k.start_mark.line + 1}"
            if k.tag == _MERGE:
                sources = v.value if isinstance(v, yaml.SequenceNode) else [v]
                if not all(isinstance(m, yaml.MappingNode) for m in sources):
                    raise ConfigError(f"{where}: a merge key (<<) takes a mapping or a list of mappings")
                merged += sources
                continue
            if not isinstance(k, yaml.ScalarNode):
                raise ConfigError(f"{where}: a key must be a plain name, not a "
                                  f"{'list' if isinstance(k, yaml.SequenceNode) else 'mapping'}")
            key = prefix + str(k.value)
            if str(k.value) in out:
                raise ConfigError(f"{where}: duplicate key {excerpt(key)} (first at line {lines[key]})")
            lines[key] = k.start_mark.line + 1
            out[str(k.value)] = walk(v, key + ".", lines)
        for m in merged:
            from_merge: dict[str, int] = {}
            for key, value in walk(m, prefix, from_merge).items():
                out.setdefault(key, value)
            for key, line in from_merge.items():
                lines.setdefault(key, line)
        return out

    return walk(node, "", lines), lines


def parse_override(text: str) -> tuple[str, Any]:
    """`actor.lr=1e-4` -> ("actor.lr", 1e-4); values are parsed as YAML (with the file's limits); a
    value that is not valid YAML is a string."""
    if "=" not in text:
        raise ConfigError(f"override {excerpt(text)}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(p == "" for p in key.split(".")):
        raise ConfigError(f"override {excerpt(text)}: empty key")
    if key.count(".") >= MAX_DEPTH:
        raise ConfigError(f"override {excerpt(text)}: no config key is nested that deep")
    if raw.strip() == "":
        return key, ""
    source = f"override {excerpt(text)}"
    try:
        node = _compose(raw, source)
    except ConfigError as e:
        if "invalid YAML" not in str(e):
            raise
        return key, raw
    if node is None:
        return key, None
    if isinstance(node, yaml.MappingNode):
        return key, parse_yaml(raw, source)[0]
    return key, _scalar_value(node, source)


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
    b = {k: f"{v:g}" if isinstance(v, float) else f"{v:,}" for k, v in b.items()}
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
        renamed = getattr(parent, "RENAMED", {}).get(loc[-1]) if parent is not None and loc else None
        if renamed:  # a key an earlier version had: say where it went
            return f"unknown key {excerpt('.'.join(map(str, loc)))}: {renamed}"
        known = f" (known here: {', '.join(sorted(parent.model_fields))})" if parent is not None else ""
        return f"unknown key {excerpt('.'.join(map(str, loc)))}{known}"
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
    return f"{text} (got {excerpt(value)})"


MAX_ERRORS = 8  # lines of one validation error; a file of 10^4 bad keys says how many more


def _raise(model: type[BaseModel], e: ValidationError, where_of) -> None:
    lines = []
    errors = e.errors()
    for err in errors[:MAX_ERRORS]:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        dotted = ".".join(str(p) for p in loc)
        shown = dotted if len(dotted) <= 80 else dotted[:80] + "..."
        lines.append(f"{where_of(dotted)}: {shown}: {_message(model, loc, err)}")
    if len(errors) > MAX_ERRORS:
        lines.append(f"... and {len(errors) - MAX_ERRORS:,} more errors")
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
        if p.is_dir():
            raise ConfigError(f"{p}: a config must be a YAML file, not a directory")
        try:
            with open_input(p, "config file", max_bytes=MAX_CONFIG_BYTES) as f:
                raw = f.read()
        except StepdapoError as e:
            raise ConfigError(str(e)) from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
        data, lines = parse_yaml(text, source)
        if not data:
            raise ConfigError(f"{p}: the config file is empty; give at least one key (the defaults are "
                              f"`stepdapo config show`), or run with configs/arithmetic.yaml")
    origin_of: dict[str, str] = {}
    for ov in overrides:
        key, value = parse_override(ov)
        origin_of[key] = f"override {excerpt(ov)}"
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


def reference_markdown(cfg: BaseModel) -> str:
    """Every key of `cfg` as Markdown: one table per section (key, default, allowed values,
    documentation), from the same field docstrings and constraints as `describe`, so the docs
    site's configuration page is generated, never copied by hand."""
    out: list[str] = []

    def cell(text: str) -> str:
        return " ".join((text or "").split()).replace("|", "\\|")

    def allowed(info) -> str:
        import typing

        def kinds(t) -> list[str]:
            origin, args = typing.get_origin(t), typing.get_args(t)
            if origin is typing.Literal:
                return [f"`{a}`" for a in args]
            if args:  # a union, or list[...]
                inner = [k for a in args for k in kinds(a)]
                return [f"a list of {' / '.join(inner)}"] if origin is list else inner
            return {bool: ["`true`", "`false`"], type(None): ["`null`"], str: ["text"]}.get(t, [])

        return "; ".join(x for x in (_bounds(info), ", ".join(kinds(info.annotation))) if x)

    def walk(obj: BaseModel, prefix: str) -> None:
        rows, subsections = [], []
        for name, info in type(obj).model_fields.items():
            value = getattr(obj, name)
            if isinstance(value, BaseModel):
                subsections.append((prefix + name, value, info.description))
                continue
            default = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
            rows.append(f"| `{prefix + name}` | `{cell(default)}` | {cell(allowed(info))} | {cell(info.description)} |")
        if rows:
            out.extend(["| key | default | allowed | what it does |", "|---|---|---|---|", *rows, ""])
        for key, value, doc in subsections:
            out.extend([f"{'#' * min(key.count('.') + 2, 4)} `{key}`", "", cell(doc) or cell(type(value).__doc__), ""])
            walk(value, key + ".")

    walk(cfg, "")
    return "\n".join(out).rstrip() + "\n"
