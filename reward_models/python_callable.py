"""A rule-based reward written as a Python function, named in a recipe as ``module:function``.

The function takes ``(prompts, responses)`` positionally, and the prompts' other dataset columns as keywords, as trl
hands its reward functions: all of them when it takes ``**kwargs``, else those it names (``answer`` for
`reward_models.math_verifier.answer_reward`). It returns one number per response. Importing the module runs its
code (`llm_iif.core.imports`). Its signature is checked when the recipe is loaded, and every call's output is
checked for length and type.
"""

from __future__ import annotations

import inspect
from numbers import Real

from llm_iif.core.errors import UserError
from llm_iif.core.imports import import_object


class CallableReward:
    """``key`` is the recipe key that names the function, for error messages. ``required_columns`` are the
    dataset columns the function cannot run without."""

    def __init__(self, path: str | None, key: str = "reward.function"):
        function = import_object(path, key)
        if not callable(function):
            raise UserError(f"{key}: '{path}' is not callable")
        self.function, self.path, self.key = function, path, key
        self.all_columns, self.named_columns, self.required_columns = True, (), ()
        try:
            parameters = list(inspect.signature(function).parameters.values())
        except ValueError:  # some builtins have no inspectable signature; the call itself will tell
            return
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) < 2 and not any(p.kind is p.VAR_POSITIONAL for p in parameters):
            raise UserError(f"{key}: '{path}' must accept (prompts, responses) and dataset columns as keywords")
        columns = [p for p in parameters[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self.all_columns = any(p.kind is p.VAR_KEYWORD for p in parameters)
        self.named_columns = tuple(p.name for p in columns)
        self.required_columns = tuple(p.name for p in columns if p.default is p.empty)

    @property
    def reads_columns(self) -> bool:
        return self.all_columns or bool(self.named_columns)

    def __call__(self, prompts: list[str], responses: list[str], **columns) -> list[float]:
        missing = [name for name in self.required_columns if name not in columns]
        if missing:
            raise UserError(f"{self.key}: '{self.path}' needs the dataset column '{missing[0]}', which the prompts' "
                            f"data lacks (columns: {', '.join(columns) or 'none but the prompt'})")
        if not self.all_columns:
            columns = {name: values for name, values in columns.items() if name in self.named_columns}
        values = self.function(prompts, responses, **columns)
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
