"""docs/recipes.md, generated from the recipe dataclasses of `llm_iif.recipes`.

Every key of every section is one table row: its type, its default (the dataclass default; ``default_factory``
is called) and its meaning, which is the string literal written under the field in its module (an attribute
docstring, read with `ast`). A field without one gets an empty meaning. A section's class docstring is
printed above its table.

    python -m llm_iif.recipes.docs            # (re)write docs/recipes.md
    python -m llm_iif.recipes.docs --check    # exit 1 if docs/recipes.md is stale
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from llm_iif.recipes import RECIPE_MODULES, ClassicRecipe, GRPORecipe, Recipe, RewardTrainRecipe

COMMAND = "python -m llm_iif.recipes.docs"
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


@dataclass(frozen=True)
class Kind:
    """One kind of recipe: its heading, its top-level dataclass and where such recipes live and are read."""

    title: str
    recipe: type
    usage: str


KINDS: tuple[Kind, ...] = (
    Kind("LM PPO recipes", Recipe,
         "`recipes/*.yaml`, read by `llm-iif train` and `llm-iif compare`: PPO (with IIF when `iif.enabled`) "
         "for a causal language model with a LoRA adapter."),
    Kind("GRPO recipes", GRPORecipe,
         "`recipes/*-grpo.yaml` (`algorithm: grpo`), read by `llm-iif train` and `llm-iif compare`: trl's "
         "GRPOTrainer through `IIFGRPOTrainer`, with IIF or a group filter (docs/grpo.md)."),
    Kind("Reward-model recipes", RewardTrainRecipe,
         "`recipes/reward/*.yaml`, read by `llm-iif reward train`: a sequence classifier trained on preference "
         "pairs, usable afterwards as an `hf-classifier` reward."),
    Kind("Classic recipes", ClassicRecipe,
         "`recipes/classic/*.yaml`, read by `llm-iif classic compare`, `llm-iif classic diagnose` and "
         "`llm-iif classic intervene`: Stable-Baselines3 PPO (with IIF) on a gymnasium environment."),
)

TOP_LEVEL = "(top level)"  # the heading for recipe keys that are not sections (a GRPO recipe's algorithm, rewards, grpo)


# ------------------------------------------------------------------------------------ reading the recipe modules

@functools.cache
def _source_docs() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(class name -> class docstring, class name -> {field -> attribute docstring}) for the classes defined
    at the top level of the recipe modules (`RECIPE_MODULES`)."""
    class_docs: dict[str, str] = {}
    field_docs: dict[str, dict[str, str]] = {}
    for node in (node for module in RECIPE_MODULES for node in ast.parse(inspect.getsource(module)).body):
        if not isinstance(node, ast.ClassDef):
            continue
        doc = ast.get_docstring(node)
        if doc:
            class_docs[node.name] = doc
        fields = field_docs.setdefault(node.name, {})
        for statement, following in zip(node.body, node.body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                fields[statement.target.id] = inspect.cleandoc(following.value.value)
    return class_docs, field_docs


def class_doc(cls: type) -> str:
    """The docstring written in the class body ('' if none; not the signature dataclasses makes up)."""
    return _source_docs()[0].get(cls.__name__, "")


def field_doc(cls: type, name: str) -> str:
    """The attribute docstring of field ``name`` of ``cls`` (or of the base class that declares it), or ''."""
    field_docs = _source_docs()[1]
    for klass in cls.__mro__:
        if name in field_docs.get(klass.__name__, {}):
            return field_docs[klass.__name__][name]
    return ""


# --------------------------------------------------------------------------------------------------- rendering

def _slug(text: str) -> str:
    """GitHub's heading anchor, before duplicates are numbered."""
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


class _Anchors:
    """Heading anchors in document order, numbered as GitHub does when a heading text repeats."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __call__(self, heading: str) -> str:
        slug = _slug(heading)
        count = self.seen.get(slug, 0)
        self.seen[slug] = count + 1
        return slug if count == 0 else f"{slug}-{count}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cell(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


def _is_section(hint: Any) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def sections(recipe: type) -> list[tuple[str, type | None, bool]]:
    """``(name, dataclass, required)`` for each section of ``recipe`` in declaration order; the keys that are
    not sections come first under `TOP_LEVEL` with dataclass None."""
    hints = typing.get_type_hints(recipe)
    fields = dataclasses.fields(recipe)
    result = [(f.name, hints[f.name], _required(f)) for f in fields if _is_section(hints[f.name])]
    if any(not _is_section(hints[f.name]) for f in fields):
        result.insert(0, (TOP_LEVEL, None, False))
    return result


def section_fields(recipe: type, section: str) -> list[tuple[type, dataclasses.Field]]:
    """The (owning dataclass, field) rows of one section's table."""
    hints = typing.get_type_hints(recipe)
    if section == TOP_LEVEL:
        return [(recipe, f) for f in dataclasses.fields(recipe) if not _is_section(hints[f.name])]
    cls = hints[section]
    return [(cls, f) for f in dataclasses.fields(cls)]


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _literal_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def type_text(hint: Any, links: dict[type, tuple[str, str]]) -> str:
    """A readable type: ``a | b`` for a Literal, ``X or null`` for Optional[X], ``list[str]``, ``dict``, and
    ``NAME section (see ...)`` for a nested dataclass documented as section NAME (``links``: class ->
    (section, anchor)), or ``NAME section plus KEY`` for one that extends it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(_literal_value(a) for a in args)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        text = " or ".join(type_text(a, links) for a in options)
        return f"{text} or null" if len(options) < len(args) else text
    if origin in (list, tuple, set, dict):
        inner = ", ".join(type_text(a, links) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if _is_section(hint):
        if hint in links:
            name, anchor = links[hint]
            return f"{name} section (see [{name}](#{anchor}))"
        base = next((b for b in hint.__mro__[1:] if b in links), None)
        if base is not None:  # a documented section with keys of its own, e.g. a weight
            name, anchor = links[base]
            inherited = {f.name for f in dataclasses.fields(base)}
            extra = ", ".join(f.name for f in dataclasses.fields(hint) if f.name not in inherited)
            return f"{name} section plus {extra} (see [{name}](#{anchor}))"
        return f"mapping ({hint.__name__})"
    if hint is Any:
        return "any"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def default_text(f: dataclasses.Field) -> str:
    """``required``, or the default in YAML flow style (JSON): `null`, `true`, `"float32"`, `[]`, ..."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return "`" + json.dumps(_plain(value), ensure_ascii=False, sort_keys=True) + "`"


def _section_list(recipe: type) -> str:
    names = [(name, required) for name, cls, required in sections(recipe) if cls is not None]
    required = [f"`{name}`" for name, req in names if req]
    optional = [f"`{name}`" for name, req in names if not req]
    parts = []
    if required:
        parts.append(f"required {', '.join(required)}")
    if optional:
        parts.append(f"optional {', '.join(optional)} (all defaults when left out)")
    return "Sections: " + "; ".join(parts) + "."


INTRO = f"""\
# Recipe reference

<!-- Generated from llm_iif/recipes/ by `{COMMAND}` (or `make docs`); do not edit by hand. -->

Recipes are YAML files made of sections, each a mapping of keys. A recipe lists only what it changes: a key
that is left out takes the default below, which is the default of the dataclass in `llm_iif/recipes/`;
keys shown as *required* have none. On the command line, `--set section.key=value` overrides any key
(repeatable; the value is parsed as YAML, and deeper keys work too, e.g. `--set eval.data.source=FILE`).
An unknown key or a value of the wrong type is an error naming the file and the key.

Types: `a | b` is one of the listed values; `X or null` also takes `null`; `list[X]` is a YAML list and
`dict` a mapping. The meanings are the field docstrings in `llm_iif/recipes/` (empty where a field has none).
"""


def render() -> str:
    """The Markdown of docs/recipes.md."""
    anchor = _Anchors()
    anchor("Recipe reference")
    # First pass: every heading's anchor, so a nested dataclass can link to where its section is documented.
    kind_anchors: list[str] = []
    section_anchors: dict[tuple[int, str], str] = {}
    links: dict[type, tuple[str, str]] = {}
    for k, kind in enumerate(KINDS):
        kind_anchors.append(anchor(kind.title))
        for name, cls, _ in sections(kind.recipe):
            section_anchors[k, name] = anchor(f"`{name}`" if cls is not None else name)
            if cls is not None:
                links.setdefault(cls, (name, section_anchors[k, name]))

    out = [INTRO]
    out.append("Contents: " + ", ".join(f"[{kind.title}](#{a})" for kind, a in zip(KINDS, kind_anchors)) + ".\n")
    for k, kind in enumerate(KINDS):
        out.append(f"## {kind.title}\n")
        out.append(f"{kind.usage} {_section_list(kind.recipe)}\n")
        for name, cls, _ in sections(kind.recipe):
            out.append(f"### `{name}`\n" if cls is not None else f"### {name}\n")
            doc = class_doc(cls) if cls is not None else ""
            if doc:
                out.append(_one_line(doc) + "\n")
            rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
            for owner, f in section_fields(kind.recipe, name):
                hint = typing.get_type_hints(owner)[f.name]
                rows.append(f"| `{f.name}` | {_cell(type_text(hint, links))} | {_cell(default_text(f))} | "
                            f"{_cell(field_doc(owner, f.name))} |")
            out.append("\n".join(rows) + "\n")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description="Write the recipe reference generated from "
                                     "llm_iif/recipes/.")
    parser.add_argument("path", nargs="?", type=Path, default=DEFAULT_PATH,
                        help=f"where to write it (default: {DEFAULT_PATH.parent.name}/{DEFAULT_PATH.name} "
                             "in the repository)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the file differs from what would be written")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.path.read_text(encoding="utf-8") if args.path.is_file() else None
        if current != text:
            again = COMMAND if args.path == DEFAULT_PATH else f"{COMMAND} {args.path}"
            state = "is stale" if current is not None else "does not exist"
            print(f"{args.path} {state}: run `{again}`", file=sys.stderr)
            return 1
        return 0
    args.path.parent.mkdir(parents=True, exist_ok=True)
    args.path.write_text(text, encoding="utf-8", newline="\n")
    print(f"wrote {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
