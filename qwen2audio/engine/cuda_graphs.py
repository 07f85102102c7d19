"""One decode step of the language model, replayed as a CUDA graph.

A decode step launches hundreds of small kernels (about ten per layer) for one token per row; on a GPU
the Python and launch overhead of issuing them, not the GPU, sets the pace (the 7B's step took 27 ms
eagerly on an H100, several times its weight-reading time). A captured graph issues them all at once.

A graph has fixed shapes and addresses, so each one is captured for a bucket: the rows decoded (a power
of two) and the keys each row attends over (a power of two >= 256, capped at the cache length). Rows and
keys past the caller's are padding: masked keys, and rows whose outputs are dropped. Every graph of a
`DecodeGraphs` reads and writes the one KV cache it was made for and shares one memory pool, which is
safe because graphs are replayed one at a time and each output is copied out before the next replay.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ..model.qwen2 import KVCache
from .kv_cache import PagedBatch

MIN_SPAN = 256


def bucket(n: int, low: int, high: int) -> int:
    """The smallest power of two >= max(n, low), capped at high."""
    return min(high, 1 << (max(n, low) - 1).bit_length())


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # (rows,) long: each row's last token
    rope: torch.Tensor  # (rows,) long: its RoPE position
    where: torch.Tensor  # (rows,) long: the cache position its new key and value go to
    allowed: torch.Tensor  # (rows, span) bool: the keys it may attend to (its new one included)
    logits: torch.Tensor  # (rows, vocab): the graph's output


class DecodeGraphs:
    """Decode steps over the first rows of `cache`, captured on first use per (rows, span) bucket."""

    def __init__(self, model, cache: KVCache):
        self.model, self.cache = model, cache
        self.rows, self.max_len = cache.k.shape[1], cache.k.shape[3]
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.lock = threading.Lock()  # generate_steps shares one model-wide instance between threads
        self.replays = 0
        self.weights = self._weights()  # graphs read the parameters at their addresses when captured

    def _weights(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self.model.language_model.parameters())

    def current(self) -> bool:
        """False once the model's weights were replaced (e.g. `model.half()`): the graphs would read freed memory."""
        return self._weights() == self.weights

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, rope: torch.Tensor, where: torch.Tensor | int,
                 allowed: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) in float32 for B rows: `tokens`, `rope` (B,) long; `where` (B,) long or one int
        for all rows; `allowed` (B, S) bool, S > every row's `where` (keys past S are masked)."""
        B, S = allowed.shape
        key = (bucket(B, 1, self.rows), bucket(S, MIN_SPAN, self.max_len))
        g = self.graphs.get(key) or self._capture(*key)
        g.tokens[:B].copy_(tokens)
        g.rope[:B].copy_(rope)
        if isinstance(where, int):
            g.where[:B].fill_(where)
        else:
            g.where[:B].copy_(where)
        g.allowed[:B].zero_()
        g.allowed[:B, : min(S, key[1])].copy_(allowed[:, : key[1]])
        g.graph.replay()
        self.replays += 1
        return g.logits[:B].float().clone()  # the next replay overwrites the graph's own output

    def _capture(self, rows: int, span: int) -> _Graph:
        device = self.cache.k.device
        pad = torch.full((rows,), span - 1, dtype=torch.long, device=device)
        # Padding rows (and the warm-up runs below) write at position span - 1: a position no row has
        # reached yet (the caller's rows are all before it) or a free row, overwritten before it is unmasked.
        g = _Graph(torch.cuda.CUDAGraph(), torch.zeros(rows, dtype=torch.long, device=device), pad.clone(), pad,
                   torch.zeros(rows, span, dtype=torch.bool, device=device), None)
        g.allowed[:, 0] = True  # padding rows attend to one key: no all-masked softmax
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up off the capture (lazy initialisation, kernel choice)
            for _ in range(2):
                self._step(g, span)
        torch.cuda.current_stream(device).wait_stream(stream)
        # thread_local: the server's other threads may use the GPU while the engine thread captures.
        with torch.cuda.graph(g.graph, pool=self.pool, capture_error_mode="thread_local"):
            g.logits = self._step(g, span)
        self.graphs[(rows, span)] = g
        return g

    def _step(self, g: _Graph, span: int) -> torch.Tensor:
        mask = torch.zeros(g.allowed.shape, dtype=self.model.dtype, device=g.allowed.device)
        mask = mask.masked_fill_(~g.allowed, float("-inf"))[:, None, None, :]  # (rows, 1, 1, span)
        return self.model.decode_rows(g.tokens, g.rope, mask, self.cache, span, where=g.where)


def enabled(model) -> bool:
    return model.device.type == "cuda" and model.use_cuda_graphs


SHARED_CACHE_BYTES = 2 * 2**30  # the largest KV cache a model keeps for generate_steps between calls


def decode_graphs_for(model, batch: int, max_len: int) -> DecodeGraphs | None:
    """DecodeGraphs for one generate_steps call, locked for it (None when CUDA graphs are off).

    The model keeps the last one (cache and graphs) for the next call when its cache is at most
    SHARED_CACHE_BYTES, so repeated calls skip the captures. A call that it does not fit, or that finds it in
    use by another thread, gets graphs over a cache of its own, freed with it.
    """
    if not enabled(model):
        return None
    kept = getattr(model, "_decode_graphs", None)
    if kept is not None and not kept.current():
        model._decode_graphs = kept = None
    if kept is not None and kept.rows >= batch and kept.max_len >= max_len and kept.lock.acquire(blocking=False):
        return kept
    limit = model.config.text_config.max_position_embeddings
    graphs = DecodeGraphs(model, model.new_cache(batch, bucket(max_len, MIN_SPAN, limit)))
    graphs.lock.acquire()
    in_use = kept is not None and kept.lock.locked()
    if not in_use and 2 * graphs.cache.k.numel() * graphs.cache.k.element_size() <= SHARED_CACHE_BYTES:
        model._decode_graphs = graphs
    return graphs


@dataclass
class _PagedGraph:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor  # (rows,) long: each row's last token
    rope: torch.Tensor  # (rows,) long: its position
    write: torch.Tensor  # (rows, 1) long: the cache slot its new key and value go to
    read: torch.Tensor  # (rows, span) long: the cache slots of the keys it attends over
    allowed: torch.Tensor  # (rows, span) bool: which of them are real (its new one included)
    logits: torch.Tensor  # (rows, vocab): the graph's output


class PagedDecodeGraphs:
    """The engine's decode steps over its paged KV cache (kv_cache.py), captured on first use per (rows, span)
    bucket. The block tables enter as slot tensors copied into the graph's inputs, so one graph serves any
    placement of blocks; padding rows write to and read from the scratch block, under a one-key mask."""

    def __init__(self, model, kv, max_rows: int, max_len: int):
        self.model, self.kv = model, kv
        self.rows, self.max_len = max_rows, max_len
        self.graphs: dict[tuple[int, int], _PagedGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.replays = 0

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, rope: torch.Tensor, write: torch.Tensor, read: torch.Tensor,
                 allowed: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) float32: `tokens`, `rope`, `write` (B,) long, `read` and `allowed` (B, S)."""
        B, S = allowed.shape
        key = (bucket(B, 1, self.rows), bucket(S, MIN_SPAN, max(self.max_len, S)))
        g = self.graphs.get(key) or self._capture(*key)
        g.tokens.zero_()
        g.rope.zero_()
        g.write.fill_(self.kv.scratch_slot)
        g.read.fill_(self.kv.scratch_slot)
        g.allowed.zero_()
        g.allowed[:, 0] = True  # padding rows attend to one key: no all-masked softmax
        g.tokens[:B].copy_(tokens)
        g.rope[:B].copy_(rope)
        g.write[:B, 0].copy_(write)
        g.read[:B, :S].copy_(read)
        g.allowed[:B, :S].copy_(allowed)
        g.graph.replay()
        self.replays += 1
        return g.logits[:B].float().clone()  # the next replay overwrites the graph's own output

    def _capture(self, rows: int, span: int) -> _PagedGraph:
        device = self.kv.k.device
        scratch = self.kv.scratch_slot
        g = _PagedGraph(torch.cuda.CUDAGraph(), torch.zeros(rows, dtype=torch.long, device=device),
                        torch.zeros(rows, dtype=torch.long, device=device),
                        torch.full((rows, 1), scratch, dtype=torch.long, device=device),
                        torch.full((rows, span), scratch, dtype=torch.long, device=device),
                        torch.zeros(rows, span, dtype=torch.bool, device=device), None)
        g.allowed[:, 0] = True
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up off the capture (lazy initialisation, kernel choice)
            for _ in range(2):
                self._step(g)
        torch.cuda.current_stream(device).wait_stream(stream)
        # thread_local: the server's other threads may use the GPU while the engine thread captures.
        with torch.cuda.graph(g.graph, pool=self.pool, capture_error_mode="thread_local"):
            g.logits = self._step(g)
        self.graphs[(rows, span)] = g
        return g

    def _step(self, g: _PagedGraph) -> torch.Tensor:
        lm = self.model.language_model
        mask = torch.zeros(g.allowed.shape, dtype=self.model.dtype, device=g.allowed.device)
        mask = mask.masked_fill_(~g.allowed, float("-inf"))[:, None, None, :]  # (rows, 1, 1, span)
        embeds = lm.model.embed_tokens(g.tokens[:, None])
        hidden = lm.model(embeds, g.rope[:, None], mask, PagedBatch(self.kv, g.write, g.read), None)
        return lm.lm_head(hidden[:, -1])
