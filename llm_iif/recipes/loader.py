"""Reading recipes: YAML, ``--set`` overrides at any depth, type coercion against the dataclasses, and the
kind of recipe a file holds. Any problem raises `UserError` with one line naming the file and the key, e.g.
``recipes/x.yaml: ppo.learning_rate: expected a float, got 'fast'``."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from llm_iif.core.errors import UserError, first_line
from llm_iif.recipes.classic import ClassicRecipe
from llm_iif.recipes.grpo import GRPORecipe
from llm_iif.recipes.ppo import Recipe


def recipe_kind(path: str | Path) -> type:
    """`GRPORecipe` for a recipe file that says ``algorithm: grpo``, `ClassicRecipe` for one with an ``env``
    section (recipes/classic/), else `Recipe` (PPO)."""
    try:
        raw = read_yaml_mapping(Path(path), "recipe")
    except UserError:
        return Recipe  # load_recipe reports the problem
    if raw.get("algorithm") == "grpo":
        return GRPORecipe
    return ClassicRecipe if "env" in raw else Recipe


def load_recipe(path: str | Path, overrides: list[str] = (), kind: type = Recipe):
    """Read, override and validate a recipe of ``kind`` (`Recipe`, `ClassicRecipe` or `RewardTrainRecipe`).

    Raises `UserError` naming the file and key on bad input."""
    path = Path(path)
    raw = read_yaml_mapping(path, "recipe")
    for item in overrides:
        _apply_override(raw, item)
    return recipe_from_dict(raw, source=str(path), kind=kind)


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>", kind: type = Recipe):
    """Validate a nested dict into a recipe of ``kind``."""
    recipe = _build(kind, raw, source, prefix="")
    recipe.check(source)
    return recipe


def _apply_override(raw: dict, item: str) -> None:
    """``--set a.b=value`` or deeper (``eval.data.source=...``): the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) < 2 or not all(parts):
        raise UserError(f"--set {item}: expected section.key=value")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"--set {item}: '{'.'.join(parts[:depth + 1])}' is not a mapping")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise UserError(f"--set {item}: the value {value!r} is not valid YAML ({_yaml_problem(err, where=False)})"
                        ) from err


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The mapping a YAML file (a recipe, a suite) holds, {} for an empty one; a `UserError` naming the file when
    it is missing, unreadable, not UTF-8 (`read_text`), not valid YAML or not a mapping. ``what`` names the kind
    of file in the errors."""
    if not path.is_file():
        raise UserError(f"{path}: {what} file not found")
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as err:
        raise UserError(f"{path}: {_yaml_problem(err)}") from err
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def read_text(path: Path, key: str | None = None) -> str:
    """The text of the UTF-8 file ``path``. Otherwise a `UserError` naming ``key`` (the recipe key that names
    the file, if any), the file, and the offset and line of its first byte that is not UTF-8."""
    where = f"{key}: {path}" if key else str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"{where}: cannot read ({err.strerror or first_line(err)})") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise UserError(f"{where}: not UTF-8 text: byte {err.start} (line {line}) is 0x{data[err.start]:02x}; "
                        "expected a UTF-8 file") from err


def _yaml_problem(err: yaml.YAMLError, where: bool = True) -> str:
    """``line L, column C: not valid YAML (problem)`` from a PyYAML error (lines and columns count from 1)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or first_line(err)
    if mark is None or not where:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: not valid YAML ({problem})"


def _build(cls: type, raw: Any, source: str, prefix: str):
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            known = ", ".join(fields)
            raise UserError(f"{source}: {prefix}{key}: unknown key (expected one of: {known})")
    values = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{source}: {key}: required key is missing")
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name] if raw[name] is not None else {}, source, key + ".")
        else:
            values[name] = _coerce(raw[name], hint, source, key)
    return cls(**values)


def _coerce(value: Any, hint: Any, source: str, key: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        sections = [a for a in options if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and sections:  # a mapping is a section: its own errors name the key at fault
            return _build(sections[0], value, source, key + ".")
        for option in options:
            try:
                return _coerce(value, option, source, key)
            except UserError:
                if len(options) == 1:
                    raise
        raise UserError(f"{source}: {key}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{source}: {key}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, key + ".")
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key}: expected a mapping, got {value!r}")
        if not args:
            return value
        return {name: _coerce(v, args[1], source, f"{key}.{name}") for name, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{source}: {key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], source, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept any string that is a plain number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"unsupported recipe field type {hint!r}")
    if not ok:
        raise UserError(f"{source}: {key}: expected {_type_name(hint)}, got {value!r}")
    return value


def _type_name(hint: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
