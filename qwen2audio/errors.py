"""The one base class of user-facing errors.

Surfaces (CLI, server, evaluator) catch `Qwen2AudioError` and show its message as the user's mistake;
anything else is a bug and keeps its traceback.
"""


class Qwen2AudioError(ValueError):
    """A problem with what the user gave (a file, a flag, a request), explained in the message."""
