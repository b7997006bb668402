"""A rule-based reward written as a Python function, named in a recipe as ``module:function``.

The function takes ``(prompts: list[str], responses: list[str])`` and returns one number per response.
Importing the module runs its code (`llm_iif.core.imports`). Its signature is checked when the recipe is loaded, and every call's output is checked for length and type.
"""

from __future__ import annotations

import inspect
from numbers import Real

from llm_iif.core.errors import UserError
from llm_iif.core.imports import import_object


class CallableReward:
    """``key`` is the recipe key that names the function, for error messages."""

    def __init__(self, path: str | None, key: str = "reward.function"):
        function = import_object(path, key)
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
