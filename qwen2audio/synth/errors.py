"""Errors of the corpus builder: user errors (Qwen2AudioError) with one-line messages."""

from __future__ import annotations

import shutil

from ..errors import Qwen2AudioError


class SynthError(Qwen2AudioError):
    """A corpus cannot be built as asked (bad option, unusable output directory, ...)."""


class MissingToolError(SynthError):
    """An external program or data package the chosen sources need is not installed."""


def require_program(program: str, apt_package: str, source: str) -> str:
    """The absolute path of `program`, or a MissingToolError naming the Debian package to install."""
    path = shutil.which(program)
    if path is None:
        raise MissingToolError(
            f"source '{source}' needs the program '{program}': install it with "
            f"'apt-get install {apt_package}', or leave '{source}' out of --sources")
    return path
