"""The Qwen2 decoder (RMSNorm, RoPE, grouped-query attention with q/k/v biases, SwiGLU) with a
preallocated KV cache. Module names equal the Hugging Face ones so checkpoints load as they are."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the input dtype, as the reference does.
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    angles = torch.cat([freqs, freqs], dim=-1)  # (P, head_dim)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: (layers, B, kv_heads, max_len, head_dim)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of batch rows [start, stop): writes through it land in this cache (a slot's prefill)."""
        return KVCache(self.k[:, start:stop], self.v[:, start:stop])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, offset: int):
        """Write k, v (B, kv_heads, T, head_dim) at positions offset.. of every row; return keys/values so far."""
        T = k.shape[2]
        self.k[layer, :, :, offset : offset + T] = k
        self.v[layer, :, :, offset : offset + T] = v
        return self.k[layer, :, :, : offset + T], self.v[layer, :, :, : offset + T]


@dataclass
class RowKVCache:
    """Decode over rows 0..B-1 of a slot cache where every row is at its own position.

    Continuous batching puts requests of different lengths side by side: row i writes its one new
    token at `positions[i]` and attends over the first `span` keys of its row (the caller masks the
    keys past each row's own length).
    """

    k: torch.Tensor  # (layers, slots, kv_heads, max_len, head_dim), shared with the owning KVCache
    v: torch.Tensor
    positions: torch.Tensor  # (B,) long: where each row's new token goes
    span: int  # keys read per row: max(positions) + 1

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, offset=None):
        B = k.shape[0]
        rows = torch.arange(B, device=k.device)
        # Advanced indices on dims 1 and 3 (split by a slice) index (B, kv_heads, head_dim) entries.
        self.k[layer, rows, :, self.positions] = k[:, :, 0]
        self.v[layer, rows, :, self.positions] = v[:, :, 0]
        return self.k[layer, :B, :, : self.span], self.v[layer, :B, :, : self.span]


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: "KVCache | RowKVCache | None", offset: int):
        B, T, _ = x.shape  # (B, T, D)
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, offset)
        causal = isinstance(mask, str)  # "causal": no padding, a plain causal prefill
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, offset):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, offset)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, embeds, positions, mask, cache: KVCache | None = None, offset: int = 0):
        """embeds (B, T, D), positions (B, T), mask: (B, 1, T, S) additive float, "causal" or None -> (B, T, D)."""
        cos = self.rope_cos[positions].unsqueeze(1).to(embeds.dtype)  # (B, 1, T, head_dim)
        sin = self.rope_sin[positions].unsqueeze(1).to(embeds.dtype)
        x = embeds
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache, offset)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
