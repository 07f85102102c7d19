"""The one base class of user-facing errors.

Every error that says "your input (a file, an option, a request, a checkpoint) is wrong" derives
from `Qwen2AudioError`; the surfaces (CLI, HTTP server, eval runner) catch only this class and show
its message without a traceback. Anything else that escapes is a bug and is shown as one: a
traceback in the CLI, a 500 with the traceback in the server's log.

It derives from ValueError so that Python callers who caught ValueError before keep working.
"""

from __future__ import annotations


class Qwen2AudioError(ValueError):
    """An input, option or file the user can fix; the message says what to change."""


class AudioTokenMismatch(Qwen2AudioError):
    """The prompt's <|AUDIO|> placeholders and the given audio disagree in count."""
