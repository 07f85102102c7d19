"""qwen2audio: a fast, checkpoint-compatible PyTorch implementation of Qwen2-Audio."""

from .audio import AudioError, load_audio
from .config import Qwen2AudioConfig
from .engine import SamplingParams
from .model import Qwen2AudioModel
from .processor import Qwen2AudioProcessor
from .tokenizer import Tokenizer

__version__ = "0.1.0"


def __getattr__(name: str):
    """`load` and `Pipeline` come from api.py on first use (PEP 562): importing a lower layer such as
    `qwen2audio.engine` runs this file first, and must not pull in the API above it (imports run one way)."""
    if name in ("load", "Pipeline"):
        from . import api

        globals().update(load=api.load, Pipeline=api.Pipeline)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AudioError", "Pipeline", "Qwen2AudioConfig", "Qwen2AudioModel", "Qwen2AudioProcessor",
           "SamplingParams", "Tokenizer", "load", "load_audio", "__version__"]
