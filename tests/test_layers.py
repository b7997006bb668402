"""The package's layering, checked from the source with `ast` (nothing is imported).

Layers, lowest first; a module imports only from its own layer or lower ones:

    0    llm_iif.core
    0.25 llm_iif.recipes                   (recipe dataclasses by kind, the loader, the recipe reference)
    0.5  llm_iif.runs                      (run directories, checkpoints, outputs, signals: every trainer's)
    1    llm_iif.attribution
    2    llm_iif.lm, llm_iif.classic       (these two never import each other)
    2.75 llm_iif.models                    (built-in models and reward-model training)
    3    llm_iif.training, llm_iif.grpo    (the PPO and GRPO trainers, which never import each other)
    4    llm_iif.analysis                  (never imports llm_iif.training: the CLI hands it build_trainer)
    5    llm_iif.cli, llm_iif.__main__, llm_iif (the top-level __init__, which may re-export)

`reward_models` is a separate top-level package: it may import from llm_iif only `llm_iif.core.errors` and
`llm_iif.core.imports`, and only llm_iif.models (layer 2.75) and higher may import it. Imports nested in
functions count. Imports under ``if TYPE_CHECKING:`` count for the layers (a type a module names is a
dependency all the same) but not for cycles: they never run, and they are the usual way to name a type from a
module that imports this one.

A new subpackage fails `test_every_module_is_in_a_known_layer` until it is added to `LAYERS` on purpose.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("llm_iif", "reward_models")

# Unit -> layer. A module's unit is its top-level package plus the first component below it (llm_iif.core.ppo
# -> llm_iif.core, llm_iif.cli -> llm_iif.cli), the package itself for its __init__, and "reward_models" for
# everything in reward_models. reward_models sits between lm/classic (2, which may not import it) and
# models (2.75, which may); what reward_models itself may import is narrowed by `RESTRICTED`.
LAYERS: dict[str, float] = {
    "llm_iif.core": 0,
    "llm_iif.recipes": 0.25,
    "llm_iif.runs": 0.5,
    "llm_iif.attribution": 1,
    "llm_iif.lm": 2,
    "llm_iif.classic": 2,
    "reward_models": 2.5,
    "llm_iif.models": 2.75,
    "llm_iif.training": 3,
    "llm_iif.grpo": 3,
    "llm_iif.analysis": 4,
    "llm_iif.cli": 5,
    "llm_iif.__main__": 5,
    "llm_iif": 5,
}
# Units of the same layer that must not import each other (in either direction).
SIBLINGS_APART: tuple[frozenset[str], ...] = (frozenset({"llm_iif.lm", "llm_iif.classic"}),
                                              frozenset({"llm_iif.training", "llm_iif.grpo"}),
                                              # analysis is handed the PPO trainer's builder by the CLI
                                              frozenset({"llm_iif.analysis", "llm_iif.training"}))
# Unit -> (a project package it is restricted in, the only modules of that package it may import).
RESTRICTED: dict[str, tuple[str, frozenset[str]]] = {
    "reward_models": ("llm_iif", frozenset({"llm_iif.core.errors", "llm_iif.core.imports"})),
}


@dataclass(frozen=True)
class Import:
    """One project-internal dependency: ``importer`` (at ``path:line``) imports module ``target``."""

    importer: str
    path: str
    line: int
    target: str
    type_only: bool = False  # under `if TYPE_CHECKING:`

    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class Project:
    modules: dict[str, str]          # module name -> path relative to the repository
    packages: set[str]               # module names that are packages (an __init__.py)
    imports: list[Import]            # resolved project-internal imports, self-imports left out
    unresolved: list[str]            # "path:line: name" for project imports that name no existing module

    def __repr__(self) -> str:  # pytest prints the fixture in a failure; the message says what matters
        return f"Project({len(self.modules)} modules, {len(self.imports)} imports)"


# ----------------------------------------------------------------------------------------------------- scanning

def module_name(relative: Path) -> tuple[str, bool]:
    """llm_iif/core/ppo.py -> ("llm_iif.core.ppo", False); llm_iif/core/__init__.py -> ("llm_iif.core", True)."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def is_project(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST, type_only: bool = False) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement below ``node`` (functions, classes, `if`/`try` blocks included) and whether it
    is under ``if TYPE_CHECKING:``."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, type_only
        return
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for child in node.body:
            yield from _import_nodes(child, True)
        for child in node.orelse:
            yield from _import_nodes(child, type_only)
        return
    for child in ast.iter_child_nodes(node):
        yield from _import_nodes(child, type_only)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterable[tuple[int, str, list[str], bool]]:
    """Every import statement anywhere in ``tree`` as ``(line, base, names, type_only)``: ``import a.b`` ->
    (line, "a.b", [], False); ``from a import x, y`` -> (line, "a", [x, y], False). Relative imports are
    resolved against ``module``."""
    for node, type_only in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, [], type_only
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                up = node.level - 1
                if up > len(package) - 1:
                    yield node.lineno, "." * node.level + (node.module or ""), [], type_only  # beyond the top
                    continue
                base = ".".join(package[:len(package) - up] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            yield node.lineno, base, [alias.name for alias in node.names], type_only


def resolve(base: str, names: list[str], modules: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """The project modules one import statement depends on, and the project names it imports that name no module.

    ``from pkg import sub`` depends on the module pkg.sub when it exists, otherwise on pkg (a re-exported name);
    ``import a.b.c`` depends on a.b.c. Parent packages that Python also runs are not counted: every module
    would otherwise depend on llm_iif/__init__.py. A relative import beyond the top-level package is unresolved."""
    if base.startswith("."):
        return [], [base]
    if not is_project(base):
        return [], []
    if base not in modules:
        return [], [base]
    targets = [f"{base}.{name}" if f"{base}.{name}" in modules else base for name in names] or [base]
    return list(dict.fromkeys(targets)), []


def scan(root: Path = REPO, packages: Iterable[str] = PACKAGES) -> Project:
    files: dict[str, tuple[Path, bool]] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name, is_package = module_name(path.relative_to(root))
            files[name] = (path, is_package)
    modules = {name: path.relative_to(root).as_posix() for name, (path, _) in files.items()}
    project = Project(modules=modules, packages={n for n, (_, p) in files.items() if p}, imports=[], unresolved=[])
    for name, (path, is_package) in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, base, names, type_only in imported_names(tree, name, is_package):
            targets, missing = resolve(base, names, modules)
            for target in targets:
                if target != name:
                    project.imports.append(Import(name, modules[name], line, target, type_only))
            project.unresolved.extend(f"{modules[name]}:{line}: {m}" for m in missing)
    return project


# ------------------------------------------------------------------------------------------------------ checks

def graph_of(imports: Iterable[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    return graph


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components in a deterministic order, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def find_cycles(imports: list[Import]) -> list[str]:
    """One message per import cycle (a strongly connected component with more than one module): its modules
    and one concrete cycle through them with the file and line of every import on it. Imports under
    ``if TYPE_CHECKING:`` are left out: they never run."""
    imports = [imp for imp in imports if not imp.type_only]
    graph = graph_of(imports)
    where = {}
    for imp in sorted(imports, key=lambda i: (i.path, i.line)):
        where.setdefault((imp.importer, imp.target), imp.where())
    messages = []
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue
        members = set(component)
        start = component[0]
        # Breadth-first from start's successors back to start, inside the component: a shortest cycle.
        previous: dict[str, str] = {}
        frontier = [start]
        found = False
        while frontier and not found:
            following = []
            for node in frontier:
                for succ in sorted(graph[node] & members):
                    if succ == start:
                        previous[start] = node
                        found = True
                        break
                    if succ not in previous:
                        previous[succ] = node
                        following.append(succ)
                if found:
                    break
            frontier = following
        path = [start]
        node = previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        path.append(start)
        path.reverse()  # start -> ... -> start
        steps = " -> ".join(f"{a} ({where[(a, b)]})" for a, b in itertools.pairwise(path)) + f" -> {start}"
        messages.append(f"import cycle among {', '.join(component)}: {steps}")
    return messages


def unit_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "reward_models":
        return "reward_models"
    return ".".join(parts[:2])


def unknown_modules(modules: Iterable[str], layers: Mapping[str, float] = LAYERS) -> list[str]:
    return sorted(m for m in modules if unit_of(m) not in layers)


def layer_violations(imports: Iterable[Import], layers: Mapping[str, float] = LAYERS,
                     apart: Iterable[frozenset[str]] = SIBLINGS_APART) -> list[str]:
    """Imports of a higher layer, or of a sibling the importer must stay apart from."""
    messages = []
    for imp in sorted(imports, key=lambda i: (i.path, i.line, i.target)):
        source, target = unit_of(imp.importer), unit_of(imp.target)
        if source not in layers or target not in layers or source == target:
            continue  # unknown units are reported by unknown_modules
        if layers[target] > layers[source]:
            messages.append(f"{imp.where()}: {imp.importer} (layer {layers[source]:g}, {source}) imports "
                            f"{imp.target} from the higher layer {layers[target]:g} ({target})")
        elif any({source, target} <= pair for pair in apart):
            messages.append(f"{imp.where()}: {imp.importer} imports {imp.target}: {source} and {target} "
                            f"must not import each other")
    return messages


def restriction_violations(imports: Iterable[Import],
                           restricted: Mapping[str, tuple[str, frozenset[str]]] = RESTRICTED) -> list[str]:
    messages = []
    for imp in sorted(imports, key=lambda i: (i.path, i.line, i.target)):
        rule = restricted.get(unit_of(imp.importer))
        if rule is None:
            continue
        package, allowed = rule
        if imp.target.split(".")[0] == package and imp.target not in allowed:
            messages.append(f"{imp.where()}: {imp.importer} imports {imp.target}; from {package} it may import "
                            f"only {', '.join(sorted(allowed))}")
    return messages


# ------------------------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def project() -> Project:
    return scan()


def _report(title: str, messages: list[str]) -> str:
    return f"{len(messages)} {title}:\n  " + "\n  ".join(messages)


def test_the_scan_sees_the_project(project):
    # Guards against a scan that silently finds nothing (and so passes every other test).
    assert "llm_iif.recipes" in project.modules
    assert "reward_models" in project.packages
    assert any(i.importer == "llm_iif.cli" for i in project.imports)


def test_no_import_cycles(project):
    cycles = find_cycles(project.imports)
    assert not cycles, _report("import cycle(s)", cycles)


def test_no_upward_or_sibling_imports(project):
    violations = layer_violations(project.imports)
    assert not violations, _report("layering violation(s)", violations)


def test_reward_models_import_only_core_errors(project):
    violations = restriction_violations(project.imports)
    assert not violations, _report("reward_models import(s) from llm_iif", violations)


def test_every_module_is_in_a_known_layer(project):
    unknown = unknown_modules(project.modules)
    assert not unknown, (f"modules outside every layer (add their subpackage to LAYERS in {Path(__file__).name} "
                         f"on purpose): {', '.join(unknown)}")


def test_project_imports_name_existing_modules(project):
    # A stale path left by the reorganisation (e.g. `from llm_iif.config import ...` in a function) would
    # otherwise only fail when that function runs.
    assert not project.unresolved, _report("import(s) of project modules that do not exist", project.unresolved)


# --------------------------------------------------------------------------------- the checker on synthetic input

def _imp(importer: str, target: str, line: int = 1) -> Import:
    return Import(importer, importer.replace(".", "/") + ".py", line, target)


MOST_CLASS_LINES, MOST_MODULE_LINES = 300, 450  # sizes someone can read in one sitting


def test_no_class_or_module_is_too_large_to_read():
    too_large = []
    for path in sorted((REPO / "llm_iif").rglob("*.py")):
        source, name = path.read_text(), path.relative_to(REPO)
        if len(source.splitlines()) > MOST_MODULE_LINES:
            too_large.append(f"{name}: {len(source.splitlines())} lines (at most {MOST_MODULE_LINES})")
        too_large += [f"{name}: class {node.name}, {node.end_lineno - node.lineno + 1} lines (at most "
                      f"{MOST_CLASS_LINES})" for node in ast.walk(ast.parse(source))
                      if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MOST_CLASS_LINES]
    assert not too_large, _report("class(es) or module(s) to split", too_large)


def test_checker_reports_a_cycle_and_an_upward_import():
    imports = [
        _imp("llm_iif.core.a", "llm_iif.core.b", 3),
        _imp("llm_iif.core.b", "llm_iif.core.c", 4),
        _imp("llm_iif.core.c", "llm_iif.core.a", 5),    # cycle a -> b -> c -> a
        _imp("llm_iif.core.c", "llm_iif.core.d", 6),    # d is not on the cycle
        _imp("llm_iif.core.d", "llm_iif.training.trainer", 7),  # upward: 0 -> 3
        _imp("llm_iif.lm.policy", "llm_iif.classic.train", 8),  # sibling
        _imp("llm_iif.classic.train", "llm_iif.lm.data", 9),    # sibling, the other way
        _imp("llm_iif.lm.policy", "reward_models.vader", 10),   # reward_models is above lm
        _imp("llm_iif.training.trainer", "reward_models.vader", 11),  # allowed
        _imp("llm_iif.analysis.report", "llm_iif.core.a", 12),  # downward: allowed
        _imp("reward_models.vader", "llm_iif.core.errors", 13),  # allowed
        _imp("reward_models.vader", "llm_iif.recipes", 14),  # not allowed
    ]
    cycles = find_cycles(imports)
    assert len(cycles) == 1
    assert "llm_iif.core.a, llm_iif.core.b, llm_iif.core.c" in cycles[0]
    assert "llm_iif.core.d" not in cycles[0]
    assert "llm_iif/core/c.py:5" in cycles[0]

    violations = layer_violations(imports)
    assert len(violations) == 4, violations
    assert violations[0].startswith("llm_iif/classic/train.py:9: ")
    assert any(v.startswith("llm_iif/core/d.py:7: ") and "llm_iif.training.trainer" in v for v in violations)
    assert any(v.startswith("llm_iif/lm/policy.py:8: ") and "must not import each other" in v for v in violations)
    assert any(v.startswith("llm_iif/lm/policy.py:10: ") and "reward_models.vader" in v for v in violations)

    restricted = restriction_violations(imports)
    assert restricted == [("reward_models/vader.py:14: reward_models.vader imports llm_iif.recipes; "
                           "from llm_iif it may import only llm_iif.core.errors, llm_iif.core.imports")]

    assert unknown_modules(["llm_iif.core.a", "llm_iif.plugins.x", "llm_iif"]) == ["llm_iif.plugins.x"]


def test_checker_on_a_synthetic_tree(tmp_path):
    # Relative imports, imports nested in functions and `from package import submodule` on real files.
    (tmp_path / "llm_iif" / "core").mkdir(parents=True)
    (tmp_path / "llm_iif" / "lm").mkdir()
    (tmp_path / "reward_models").mkdir()
    files = {
        "llm_iif/__init__.py": "from llm_iif.lm import policy\n",
        "llm_iif/core/__init__.py": "",
        "llm_iif/core/ppo.py": "def f():\n    from ..lm.policy import Policy\n",
        "llm_iif/core/types.py": ("import typing\nif typing.TYPE_CHECKING:\n    from llm_iif import lm\n"
                                  "else:\n    pass\n"),
        "llm_iif/lm/__init__.py": "from . import policy\n",
        "llm_iif/lm/policy.py": "import os\nfrom llm_iif.core import ppo, types\nfrom .missing import x\n",
        "reward_models/__init__.py": "import llm_iif.core.errors\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    project = scan(tmp_path)
    edges = {(i.importer, i.target, i.line, i.type_only) for i in project.imports}
    assert edges == {
        ("llm_iif", "llm_iif.lm.policy", 1, False),
        ("llm_iif.core.ppo", "llm_iif.lm.policy", 2, False),
        ("llm_iif.core.types", "llm_iif.lm", 3, True),
        ("llm_iif.lm", "llm_iif.lm.policy", 1, False),
        ("llm_iif.lm.policy", "llm_iif.core.ppo", 2, False),
        ("llm_iif.lm.policy", "llm_iif.core.types", 2, False),
    }
    assert project.unresolved == ["llm_iif/lm/policy.py:3: llm_iif.lm.missing",
                                  "reward_models/__init__.py:1: llm_iif.core.errors"]
    # The type-only import closes no cycle (types -> lm -> policy -> types) but is still an upward import.
    assert find_cycles(project.imports) == [
        ("import cycle among llm_iif.core.ppo, llm_iif.lm.policy: llm_iif.core.ppo (llm_iif/core/ppo.py:2) -> "
         "llm_iif.lm.policy (llm_iif/lm/policy.py:2) -> llm_iif.core.ppo")]
    assert layer_violations(project.imports) == [
        ("llm_iif/core/ppo.py:2: llm_iif.core.ppo (layer 0, llm_iif.core) imports llm_iif.lm.policy from the "
         "higher layer 2 (llm_iif.lm)"),
        ("llm_iif/core/types.py:3: llm_iif.core.types (layer 0, llm_iif.core) imports llm_iif.lm from the "
         "higher layer 2 (llm_iif.lm)")]
