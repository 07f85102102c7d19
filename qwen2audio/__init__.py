"""qwen2audio: a fast, checkpoint-compatible PyTorch implementation of Qwen2-Audio."""

from .api import Pipeline, load
from .audio import AudioError, load_audio
from .config import Qwen2AudioConfig
from .engine import SamplingParams
from .model import Qwen2AudioModel
from .processor import Qwen2AudioProcessor
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["AudioError", "Pipeline", "Qwen2AudioConfig", "Qwen2AudioModel", "Qwen2AudioProcessor",
           "SamplingParams", "Tokenizer", "load", "load_audio", "__version__"]
