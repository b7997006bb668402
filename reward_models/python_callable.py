"""A rule-based reward written as a Python function, named in a recipe as ``module:function``.

The function takes ``(prompts: list[str], responses: list[str])`` and returns one number per response.
Its signature is checked when the recipe is loaded, and every call's output is checked for length and type.
"""

from __future__ import annotations

import importlib
import inspect
from numbers import Real

from llm_iif.core.errors import UserError


class CallableReward:
    """``key`` is the recipe key that names the function, for error messages."""

    def __init__(self, path: str | None, key: str = "reward.function"):
        if not path or path.count(":") != 1:
            raise UserError(f"{key}: expected module:function, got {path!r}")
        module_name, _, name = path.partition(":")
        try:
            function = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as err:
            raise UserError(f"{key}: cannot import '{path}' ({err})") from err
        if not callable(function):
            raise UserError(f"{key}: '{path}' is not callable")
        try:
            inspect.signature(function).bind([], [])
        except TypeError as err:
            raise UserError(f"{key}: '{path}' must accept (prompts, responses) ({err})") from err
        except ValueError:  # some builtins have no inspectable signature; the call itself will tell
            pass
        self.function, self.path, self.key = function, path, key

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        values = self.function(prompts, responses)
        try:
            values = list(values)
        except TypeError:
            raise UserError(f"{self.key}: '{self.path}' returned {type(values).__name__}; expected a list "
                            "of numbers") from None
        if len(values) != len(responses):
            raise UserError(f"{self.key}: '{self.path}' returned {len(values)} values for {len(responses)} "
                            "responses; expected one per response")
        bad = next((v for v in values if not isinstance(v, Real) or isinstance(v, bool)), None)
        if bad is not None:
            raise UserError(f"{self.key}: '{self.path}' returned {bad!r}; expected a number per response")
        return [float(v) for v in values]
