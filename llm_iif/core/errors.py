"""User-facing errors.

A `UserError` is bad input (a recipe, a path, a model id). The CLI prints its message as one line and
exits with code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user; the message names the file, key or value and what was expected."""
