"""The paged KV cache: every layer's keys and values in fixed-size blocks of token slots.

A request owns a list of blocks (its block table, block_manager.py) instead of one row of `max_len` positions,
so memory follows the tokens really held, a finished request frees its blocks without moving anyone else's
keys, and two requests that share a prompt prefix share its blocks (prefix caching).

Slot `b * block_size + i` holds token `i` of block `b`. One extra block past the pool is scratch: padding queries
write their keys there and padding keys read from there, so padded batches need no branches (the mask hides it).

Attention over paged keys (`PagedBatch.update`, called by every layer through the model's cache interface)
gathers each row's keys into one contiguous (B, kv_heads, S, head_dim) tensor and lets the model's
scaled_dot_product_attention run as before: simple and exact, the same arithmetic on the same values as a
contiguous cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import TextConfig

BLOCK_SIZE = 16  # tokens per block: small enough that a prefix shared by two prompts loses < 16 tokens of reuse


@dataclass
class PagedKVCache:
    """(layers, (num_blocks + 1) * block_size, kv_heads, head_dim) keys and values; the last block is scratch."""

    k: torch.Tensor
    v: torch.Tensor
    block_size: int

    @classmethod
    def allocate(cls, cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device) -> "PagedKVCache":
        shape = (cfg.num_hidden_layers, (num_blocks + 1) * block_size, cfg.num_key_value_heads, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   block_size)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1] // self.block_size - 1

    @property
    def scratch_slot(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def slots_of(block_table: list[int], start: int, stop: int, block_size: int) -> list[int]:
    """Cache slots of token positions start..stop-1 of a request with this block table."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, stop)]


@dataclass
class PagedBatch:
    """One forward pass over B rows of the paged cache; passed to the model as its `cache`.

    Row b feeds T tokens (fewer real ones are padded) whose keys and values go to `write_slots[b]`, then attends
    over the keys in `read_slots[b]` (its whole context so far, these tokens included; padding reads scratch)
    under the caller's mask. `direct` marks a batch of fresh prompts (nothing cached before them, no padding):
    their own keys are all they attend to, so attention uses them as computed, with no gather.
    """

    cache: PagedKVCache
    write_slots: torch.Tensor  # (B, T) long
    read_slots: torch.Tensor  # (B, S) long
    direct: bool = False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, kv_heads, T, head_dim) -> keys and values (B, kv_heads, S, head_dim) each row attends over."""
        B, H, T, D = k.shape
        where = self.write_slots.reshape(-1)
        self.cache.k[layer].index_copy_(0, where, k.transpose(1, 2).reshape(B * T, H, D))
        self.cache.v[layer].index_copy_(0, where, v.transpose(1, 2).reshape(B * T, H, D))
        if self.direct:
            return k, v
        S = self.read_slots.shape[1]
        read = self.read_slots.reshape(-1)
        keys = self.cache.k[layer].index_select(0, read).view(B, S, H, D).transpose(1, 2)
        values = self.cache.v[layer].index_select(0, read).view(B, S, H, D).transpose(1, 2)
        return keys, values
