"""Tiny Qwen2-Audio checkpoints built in the test by the reference implementation (random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qwen2audio.processor import Qwen2AudioProcessor
from qwen2audio.tokenizer import Tokenizer

CORPUS = [
    "What's that sound? Transcribe the speech. Detect the language and recognize the speech:",
    "Generate the caption in English: a dog barks while rain falls on a tin roof.",
    "You are a helpful assistant. Audio 1: Audio 2: How about this one? The answer is B.",
    "hello world 0123456789 the quick brown fox jumps over the lazy dog",
]

# name -> (audio overrides, text overrides). Widths, heads, GQA ratios, tied embeddings, 80/128 mels.
VARIANTS = {
    "base": (dict(d_model=64, encoder_attention_heads=4, encoder_ffn_dim=128, encoder_layers=2, num_mel_bins=128),
             dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)),
    "gqa_tied": (dict(d_model=48, encoder_attention_heads=2, encoder_ffn_dim=96, encoder_layers=1, num_mel_bins=80),
                 dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=2, tie_word_embeddings=True)),
    "mqa_wide": (dict(d_model=96, encoder_attention_heads=6, encoder_ffn_dim=192, encoder_layers=2, num_mel_bins=128),
                 dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=1)),
}


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS * 4, vocab_size=400)


def build_reference_model(variant: str = "base", seed: int = 0, weight_std: float = 0.15):
    """A transformers Qwen2AudioForConditionalGeneration with random weights, plus our tokenizer."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    audio, text = VARIANTS[variant]
    tok = tiny_tokenizer()
    cfg = Qwen2AudioConfig(
        audio_config=dict(**audio, max_source_positions=1500),
        text_config=dict(vocab_size=tok.vocab_size + 3, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         rope_theta=10000.0, **text),
        audio_token_index=tok.audio_id,
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger random weights than the default init, so greedy choices are not near-ties
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, weight_std)
        if text.get("tie_word_embeddings"):  # transformers 5.x never ties Qwen2-Audio itself: make them equal
            model.lm_head.weight.copy_(model.model.language_model.embed_tokens.weight)
    return model, tok


def save_reference_checkpoint(directory: Path, variant: str = "base", seed: int = 0):
    model, tok = build_reference_model(variant, seed)
    model.save_pretrained(directory)
    Qwen2AudioProcessor(tok, n_mels=model.config.audio_config.num_mel_bins).save_pretrained(directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.im_end_id, tok.endoftext_id]}))
    return model, tok


def sine(seconds: float, freq: float = 440.0, sr: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def run_until_idle(engine, limit=10_000):
    """Step an LLMEngine until it has no work left."""
    for _ in range(limit):
        if not engine.scheduler.has_work():
            return
        engine.step()
    raise AssertionError("engine did not finish")
