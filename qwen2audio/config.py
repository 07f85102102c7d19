"""Typed mirrors of a Qwen2-Audio ``config.json`` (``audio_config`` + ``text_config``).

Field names equal the Hugging Face ones so a config round-trips unchanged; fields a file leaves out
take the reference defaults (Qwen2AudioEncoderConfig / Qwen2Config as used by Qwen2-Audio).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import Qwen2AudioError


class ConfigError(Qwen2AudioError):
    """A config.json that cannot describe a Qwen2-Audio model."""


def _from_dict(cls, data: dict[str, Any]):
    """Build dataclass `cls` from `data`, keeping unknown keys in `extra` so saving loses nothing."""
    names = {f.name for f in fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    extra = {k: v for k, v in data.items() if k not in names}
    try:
        obj = cls(**known)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{cls.__name__}: invalid field value ({e})") from None
    obj.extra = extra
    return obj


def _to_dict(obj) -> dict[str, Any]:
    out = dict(obj.extra)
    for f in fields(obj):
        if f.name != "extra" and not f.name.startswith("_"):
            out[f.name] = getattr(obj, f.name)
    return out


@dataclass
class AudioConfig:
    """The Whisper-style audio encoder (``audio_tower``)."""

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    scale_embedding: bool = False
    model_type: str = "qwen2_audio_encoder"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.d_model % self.encoder_attention_heads:
            raise ConfigError(
                f"audio_config.d_model={self.d_model} is not divisible by "
                f"encoder_attention_heads={self.encoder_attention_heads}"
            )
        if self.activation_function != "gelu":
            raise ConfigError(f"audio_config.activation_function={self.activation_function!r}: only 'gelu' is supported")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def max_mel_frames(self) -> int:
        # conv2 has stride 2, so the encoder sees 2 mel frames per position: 1500 -> 3000 frames (30 s).
        return 2 * self.max_source_positions


@dataclass
class TextConfig:
    """The Qwen2 decoder. Defaults are Qwen2-Audio-7B's (Qwen-7B in the Qwen2 layout)."""

    vocab_size: int = 156032
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    head_dim: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "qwen2"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"text_config.hidden_act={self.hidden_act!r}: only 'silu' is supported")
        if self.use_sliding_window:
            raise ConfigError("text_config.use_sliding_window=true is not supported (Qwen2-Audio does not use it)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TextConfig":
        data = dict(data)
        # transformers >= 4.5x writes RoPE settings as `rope_parameters`, older files as `rope_theta`.
        rope = data.pop("rope_parameters", None) or data.pop("rope_scaling", None)
        if rope:
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise ConfigError(f"text_config RoPE scaling {rope!r} is not supported")
            data.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
        return _from_dict(cls, data)


@dataclass
class Qwen2AudioConfig:
    audio_config: AudioConfig = field(default_factory=AudioConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    audio_token_index: int = 151646
    model_type: str = "qwen2_audio"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Qwen2AudioConfig":
        data = dict(data)
        if data.get("model_type", "qwen2_audio") != "qwen2_audio":
            raise ConfigError(f"model_type={data['model_type']!r}, expected 'qwen2_audio'")
        audio = _from_dict(AudioConfig, data.pop("audio_config", None) or {})
        text = TextConfig.from_dict(data.pop("text_config", None) or {})
        if "audio_token_id" in data and "audio_token_index" not in data:
            data["audio_token_index"] = data.pop("audio_token_id")
        cfg = _from_dict(cls, {k: v for k, v in data.items() if k not in ("audio_config", "text_config")})
        cfg.audio_config, cfg.text_config = audio, text
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "Qwen2AudioConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json (is this a Qwen2-Audio checkpoint directory?)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out = _to_dict(self)
        out["audio_config"] = _to_dict(self.audio_config)
        text = _to_dict(self.text_config)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
        out["text_config"] = text
        out.setdefault("architectures", ["Qwen2AudioForConditionalGeneration"])
        return out

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_name(cls, name: str, **text_overrides) -> "Qwen2AudioConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        preset = PRESETS[name]
        audio = dataclasses.replace(preset.audio_config)
        text = dataclasses.replace(preset.text_config, **text_overrides)
        return cls(audio_config=audio, text_config=text, audio_token_index=preset.audio_token_index)


PRESETS: dict[str, Qwen2AudioConfig] = {
    # The released Qwen2-Audio-7B / -Instruct.
    "7b": Qwen2AudioConfig(),
    # Tiny shapes for tests: a real Qwen2 vocabulary size is not needed, ids come from the tokenizer.
    "tiny": Qwen2AudioConfig(
        audio_config=AudioConfig(num_mel_bins=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, d_model=64),
        text_config=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
        audio_token_index=259,
    ),
    # Benchmark size: large enough for CPU timings to mean something, small enough to build in seconds.
    "bench": Qwen2AudioConfig(
        audio_config=AudioConfig(num_mel_bins=128, encoder_layers=4, encoder_attention_heads=8, encoder_ffn_dim=2048, d_model=512),
        text_config=TextConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096),
        audio_token_index=259,
    ),
}
