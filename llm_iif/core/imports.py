"""Python objects a recipe names as ``module:name`` (a callable reward, a gymnasium wrapper).

Importing such a module runs its code: that is the point of naming it. The current directory is searched
first, as ``python -m llm_iif`` does, so a module beside the recipe imports the same way through the
installed ``llm-iif`` script.

Also `require_classic`: whether the optional ``classic`` extra (Stable-Baselines3) is installed.
"""

from __future__ import annotations

import importlib
import os
import sys

from llm_iif.core.errors import MissingExtra, UserError, first_line


def import_object(spec: str | None, key: str, what: str = "module:function"):
    """The object ``spec`` (``module:name``) names; `UserError` naming ``key`` when it cannot be imported,
    including when importing the module raises (a syntax error, an exception at import)."""
    if not spec or spec.count(":") != 1:
        raise UserError(f"{key}: expected {what}, got {spec!r}")
    module_name, _, name = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as err:
        raise UserError(f"{key}: cannot import '{spec}': syntax error in {err.filename}, line {err.lineno}") from err
    except Exception as err:  # any exception from the module's own code at import is the module's problem
        raise UserError(f"{key}: cannot import '{spec}' ({type(err).__name__}: {first_line(err)})") from err
    try:
        return getattr(module, name)
    except AttributeError:
        raise UserError(f"{key}: cannot import '{spec}' (module '{module_name}' has no '{name}')") from None


def require_classic() -> None:
    """Check that the ``classic`` extra is installed (Stable-Baselines3, which brings gymnasium). Every classic
    entry point calls this first: ``llm_iif.classic`` on import and each ``llm-iif classic`` command, so a
    missing extra is one line naming it rather than a traceback. Raises `MissingExtra` (a `UserError` and an
    `ImportError`) naming the first module that cannot be imported."""
    try:
        importlib.import_module("stable_baselines3")
    except ModuleNotFoundError as err:  # e.g. no stable_baselines3, or an SB3 without its gymnasium
        raise MissingExtra("classic RL needs the classic extra: pip install 'llm_iif[classic]' "
                           f"(missing: {err.name or 'stable_baselines3'})") from None
