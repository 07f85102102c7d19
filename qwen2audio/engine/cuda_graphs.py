"""One decode step of the language model, replayed as a CUDA graph.

A decode step launches hundreds of small kernels (about ten per layer) for one token per row; on a GPU
the Python and launch overhead of issuing them, not the GPU, sets the pace (the 7B's step took 27 ms
eagerly on an H100, several times its weight-reading time). A captured graph issues them all at once.

A graph has fixed shapes and addresses, so each one is captured for a bucket: the rows decoded (a power
of two) and the keys each row attends over (a power of two >= 256, capped at the engine's longest request).
Rows and keys past the caller's are padding: they write to and read from the paged cache's scratch block
under a one-key mask, and their outputs are dropped. Every graph of a `PagedDecodeGraphs` reads and writes
the one paged KV cache it was made for and shares one memory pool, which is safe because graphs are
replayed one at a time and each output is copied out before the next replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import PagedBatch

MIN_SPAN = 256


def bucket(n: int, low: int, high: int) -> int:
    """The smallest power of two >= max(n, low), capped at high."""
    return min(high, 1 << (max(n, low) - 1).bit_length())


def enabled(model) -> bool:
    return model.device.type == "cuda" and model.use_cuda_graphs


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
        hidden = lm.model(embeds, g.rope[:, None], mask, PagedBatch(self.kv, g.write, g.read))
        return lm.lm_head(hidden[:, -1])
