"""Synthetic corpus builder (`qwen2audio synth`): TTS speech, real Asterisk prompts, generated
sounds, fluidsynth music and mixtures -> 16 kHz WAV + JSONL for pre-training and SFT.

    from qwen2audio.synth import build_corpus
    manifest = build_corpus("corpus/", size="tiny", seed=0, jobs=2)
"""

from .build import build_corpus
from .errors import MissingToolError, SynthError
from .plan import KINDS, SIZES, SOURCES

__all__ = ["build_corpus", "SynthError", "MissingToolError", "KINDS", "SIZES", "SOURCES"]
