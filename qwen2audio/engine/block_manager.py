"""Which KV-cache blocks hold which request's tokens, and prefix caching by block hash.

Pure bookkeeping (the tensors are in kv_cache.py). A full block gets a hash that chains the previous block's hash
with its token ids and, where its positions hold audio, the content keys of those clips' windows (the ids there are
all <|AUDIO|>: without the keys two different clips would look alike). Equal hashes therefore mean equal keys and
values, so a request whose prompt starts with blocks already in the cache (a conversation re-sent with one more
turn) takes those blocks instead of computing them again.

A block is referenced by every request whose table holds it. At zero references it is free but keeps its contents
and hash, so a later prompt can still find it; free blocks are reused least recently freed first, blocks that
never got a hash (partial tails) before any cached one.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from ..features import num_audio_tokens, num_valid_frames


@dataclass(eq=False)
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None


def audio_runs(ids: list[int], audio_id: int, windows, keys: list[bytes]) -> list[tuple[int, int, bytes]]:
    """(start, stop, window key) of each window's <|AUDIO|> positions, in prompt order: the processor gives
    window w exactly num_audio_tokens(its frames) consecutive placeholders, in window order."""
    positions = [i for i, t in enumerate(ids) if t == audio_id]
    runs, at = [], 0
    for window, key in zip(windows, keys):
        n = int(num_audio_tokens(num_valid_frames(len(window))))
        if at + n > len(positions):
            break  # fewer placeholders than audio: the model's embed() reports the mismatch
        runs.append((positions[at], positions[at + n - 1] + 1, key))
        at += n
    return runs


def block_hash(previous: bytes | None, token_ids: list[int], audio_keys: list[bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=16, person=b"q2a-kv-block")
    h.update(previous or b"")
    h.update(len(token_ids).to_bytes(4, "little"))
    h.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    for key in audio_keys:
        h.update(key)
    return h.digest()


def hashes_of(token_ids: list[int], runs: list[tuple[int, int, bytes]], block_size: int, start: int, stop: int,
              previous: bytes | None) -> list[bytes]:
    """Hashes of full blocks start..stop-1 of a token sequence whose audio windows sit at `runs`."""
    out = []
    for b in range(start, stop):
        lo, hi = b * block_size, (b + 1) * block_size
        keys = [key for a, z, key in runs if a < hi and z > lo]
        previous = block_hash(previous, token_ids[lo:hi], keys)
        out.append(previous)
    return out


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # next reused first
        self.cached: dict[bytes, int] = {}  # block hash -> the block holding it
        self.hit_tokens = 0  # prompt tokens served from the cache (statistics)
        self.queried_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def cached_prefix(self, hashes: list[bytes]) -> list[int]:
        """The blocks of the longest prefix of `hashes` found in the cache."""
        found = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            found.append(b)
        return found

    def new_blocks_needed(self, cached: list[int], num_tokens: int) -> int:
        """Free blocks an allocation takes: a block for every token not cached, plus the cached blocks that are
        free now (taking one removes it from the free list)."""
        return self.blocks_for(num_tokens) - len(cached) + sum(self.blocks[b].ref_count == 0 for b in cached)

    def allocate(self, cached: list[int], num_tokens: int) -> list[int]:
        """A block table for `num_tokens` tokens whose first blocks are the cached ones."""
        table = []
        for b in cached:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self.free[b]
            block.ref_count += 1
            table.append(b)
        while len(table) < self.blocks_for(num_tokens):
            table.append(self._take_free())
        return table

    def grow(self, table: list[int], num_tokens: int) -> bool:
        """Extend `table` to hold `num_tokens`; False (table unchanged) when the free blocks do not suffice."""
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            return False
        for _ in range(need):
            table.append(self._take_free())
        return True

    def release(self, table: list[int]) -> None:
        """Drop one reference to each block; the last block first, so a prompt's head stays cached longest."""
        for b in reversed(table):
            block = self.blocks[b]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[b] = None
                if block.hash is None:  # nothing anyone could find again: reuse it first
                    self.free.move_to_end(b, last=False)
        table.clear()

    def register(self, table: list[int], hashes: list[bytes], start: int) -> None:
        """Blocks start.. of `table` are now full and computed, with these hashes: make them findable."""
        for b, h in zip(table[start:], hashes[start:]):
            block = self.blocks[b]
            if block.hash is None and h not in self.cached:
                block.hash = h
                self.cached[h] = b

    def _take_free(self) -> int:
        b, _ = self.free.popitem(last=False)
        block = self.blocks[b]
        if block.hash is not None:  # evicted: its contents are about to be overwritten
            del self.cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return b

    def stats(self) -> dict:
        return {"kv_blocks": len(self.blocks), "kv_blocks_free": self.num_free, "kv_block_size": self.block_size,
                "prefix_cached_blocks": len(self.cached), "prefix_hit_tokens": self.hit_tokens,
                "prefix_queried_tokens": self.queried_tokens}
