from .encoder import AudioEncoder
from .qwen2 import Qwen2ForCausalLM
from .qwen2_audio import Qwen2AudioModel

__all__ = ["AudioEncoder", "Qwen2ForCausalLM", "Qwen2AudioModel"]
