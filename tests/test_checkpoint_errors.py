"""Broken checkpoint directories give one clear error naming the file, never a raw library exception."""

import json
import shutil

import pytest

import qwen2audio
from qwen2audio.config import ConfigError
from qwen2audio.tokenizer import TokenizerError
from qwen2audio.weights import CheckpointError


@pytest.fixture
def copy(tiny_checkpoint, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint[0], target)
    return target


@pytest.mark.parametrize(
    "breakage, error, words",
    [
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), CheckpointError, "model.safetensors"),
        (lambda d: (d / "model.safetensors").unlink(), CheckpointError, "no model.safetensors"),
        (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), CheckpointError, "safetensors only"),
        (lambda d: (d / "config.json").write_text("{not json"), ConfigError, "config.json"),
        (lambda d: (d / "config.json").unlink(), ConfigError, "no config.json"),
        (lambda d: _set_config(d, hidden_size="abc"), ConfigError, "invalid field value"),
        (lambda d: _set_config(d, num_hidden_layers=3), CheckpointError, "missing"),
        (lambda d: (d / "tokenizer.json").write_text("{}"), TokenizerError, "tokenizer.json"),
        (lambda d: (d / "tokenizer_config.json").write_text("]"), TokenizerError, "tokenizer_config.json"),
        (lambda d: (d / "generation_config.json").write_text("nope"), CheckpointError, "generation_config.json"),
        (lambda d: _set_top(d, audio_token_index=7), CheckpointError, "audio_token_index=7"),
    ],
    ids=["corrupt-weights", "no-weights", "pickle-only", "bad-config-json", "no-config", "bad-field", "shape-mismatch",
         "bad-tokenizer", "bad-tokenizer-config", "bad-generation-config", "audio-id-mismatch"],
)
def test_broken_checkpoint(copy, breakage, error, words):
    breakage(copy)
    with pytest.raises(error, match=words):
        qwen2audio.load(copy, device="cpu", progress=False)


def _set_config(directory, **text_fields):
    cfg = json.loads((directory / "config.json").read_text())
    cfg["text_config"].update(text_fields)
    (directory / "config.json").write_text(json.dumps(cfg))


def _set_top(directory, **fields):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(fields)
    (directory / "config.json").write_text(json.dumps(cfg))


def test_missing_directory():
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        qwen2audio.load("/nonexistent/qwen2audio-model", device="cpu")


def test_missing_audio_file_is_named(tiny_checkpoint):
    pipe = qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False)
    with pytest.raises(qwen2audio.AudioError, match="missing-clip.wav"):
        pipe.transcribe("missing-clip.wav")
