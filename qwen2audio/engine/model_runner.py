"""The engine's tensor side: the paged KV cache, CUDA graphs, the encoded-audio cache, and the model calls.

`ModelRunner` turns planned work (scheduler.py: prompt chunks and decode rows, each with its block table) into
tensors and the model's logits; it knows nothing of sampling, text or request lifetimes (llm_engine.py). It owns
the KV cache (kv_cache.py); nothing is attached to the model object.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..errors import AudioTokenMismatch
from ..features import log_mel_spectrogram
from ..model.qwen2_audio import Qwen2AudioModel
from .audio_cache import AudioEmbeddingCache
from .cuda_graphs import PagedDecodeGraphs, enabled
from .inputs import PromptInputs
from .kv_cache import PagedBatch, PagedKVCache
from .scheduler import Chunk, Sequence


def kv_bytes_per_token(model: Qwen2AudioModel) -> int:
    t = model.config.text_config
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * model.dtype.itemsize


class ModelRunner:
    def __init__(self, model: Qwen2AudioModel, num_blocks: int, block_size: int, max_rows: int, max_len: int,
                 counters: Counter, audio_cache_bytes: int, n_mels: int):
        self.model = model
        self.n_mels = n_mels
        self.counters = counters  # the engine's statistics; this side counts encoded audio windows
        t = model.config.text_config
        self.kv = PagedKVCache.allocate(t, num_blocks, block_size, model.dtype, model.device)
        self.kv_cache_bytes = self.kv.bytes
        self.max_positions = t.max_position_embeddings
        # CUDA: decode steps replayed as graphs
        self.graphs = PagedDecodeGraphs(model, self.kv, max_rows, max_len) if enabled(model) else None
        self.audio_cache = AudioEmbeddingCache(audio_cache_bytes)

    # ---- the two passes -----------------------------------------------------------------------
    def prefill(self, chunks: list[Chunk]) -> torch.Tensor:
        """Prompt chunks, one row each (right-padded to the longest), each attending to its own earlier tokens (in
        the cache: computed by earlier chunks or shared from the prefix cache) and to itself -> the logits (n, V)
        float32 at each chunk's last token."""
        model, device = self.model, self.model.device
        lm = model.language_model
        lengths = [c.stop - c.start for c in chunks]
        B, T = len(chunks), max(lengths)
        embeds = torch.zeros(B, T, model.config.text_config.hidden_size, dtype=model.dtype, device=device)
        for i, c in enumerate(chunks):
            embeds[i, : lengths[i]] = self.embed_chunk(c)
        starts = torch.tensor([c.start for c in chunks], device=device)
        stops = torch.tensor([c.stop for c in chunks], device=device)
        steps = torch.arange(T, device=device)
        positions = (starts[:, None] + steps).clamp(max=self.max_positions - 1)  # (B, T); padding clamped
        real_query = steps[None, :] < (stops - starts)[:, None]  # (B, T)
        table = self._table([c.seq for c in chunks])
        write = torch.where(real_query, self._slots(table, positions), self._scratch(positions))
        S = int(stops.max())
        keys = torch.arange(S, device=device)
        read = self._slots(table, keys.expand(B, S))
        read = torch.where(keys[None, :] < stops[:, None], read, self._scratch(keys.expand(B, S)))
        fresh = all(c.start == 0 for c in chunks) and len(set(lengths)) == 1
        if fresh:  # whole prompts of one length: plain causal attention over their own keys, no gather
            mask = "causal"
        else:
            allowed = keys[None, None, :] <= positions[:, :, None]  # causal over the whole context: (B, T, S)
            allowed &= real_query[:, :, None]
            allowed |= (~real_query[:, :, None]) & (keys == 0)[None, None, :]  # padding queries see one key
            mask = torch.zeros(allowed.shape, dtype=model.dtype, device=device).masked_fill_(~allowed, float("-inf"))
            mask = mask[:, None]  # (B, 1, T, S)
        batch = PagedBatch(self.kv, write, read, direct=fresh)
        hidden = lm.model(embeds, positions, mask, batch)  # (B, T, D)
        last = hidden[torch.arange(B, device=device), torch.tensor(lengths, device=device) - 1]
        return lm.lm_head(last).float()

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for every decoding request: each writes its last sampled token at position num_computed and
        attends over its keys 0..num_computed -> logits (B, V) float32."""
        device = self.model.device
        lm = self.model.language_model
        B = len(seqs)
        pos = torch.tensor([s.num_computed for s in seqs], device=device)
        tokens = torch.tensor([s.last_token for s in seqs], device=device)
        S = int(pos.max()) + 1
        keys = torch.arange(S, device=device)
        allowed = keys[None, :] <= pos[:, None]  # (B, S)
        table = self._table(seqs)
        read = torch.where(allowed, self._slots(table, keys.expand(B, S)), self._scratch(keys.expand(B, S)))
        write = self._slots(table, pos[:, None])  # (B, 1)
        if self.graphs is not None and self.model.use_cuda_graphs:  # (tests switch graphs off to compare with eager)
            return self.graphs(tokens, pos, write[:, 0], read, allowed)
        mask = None  # rows at one common position see exactly their own keys: no mask needed
        if not bool(allowed.all()):
            mask = torch.zeros(allowed.shape, dtype=self.model.dtype, device=device)
            mask = mask.masked_fill_(~allowed, float("-inf"))[:, None, None, :]  # (B, 1, 1, S)
        embeds = lm.model.embed_tokens(tokens[:, None])  # generated ids are plain text: no audio to merge
        hidden = lm.model(embeds, pos[:, None], mask, PagedBatch(self.kv, write, read))
        return lm.lm_head(hidden[:, -1]).float()

    # ---- tensors from block tables -------------------------------------------------------------
    def _table(self, seqs: list[Sequence]) -> torch.Tensor:
        """Block tables (B, blocks), padded with the scratch block."""
        width = max(len(s.block_table) for s in seqs)
        pad = self.kv.num_blocks
        return torch.tensor([s.block_table + [pad] * (width - len(s.block_table)) for s in seqs],
                            device=self.model.device)

    def _slots(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Cache slots of token positions (B, N) of each row of `table`; positions past a table give scratch."""
        bs = self.kv.block_size
        block = (positions // bs).clamp(max=table.shape[1] - 1)
        return table.gather(1, block) * bs + positions % bs

    def _scratch(self, positions: torch.Tensor) -> torch.Tensor:
        return self.kv.scratch_slot + positions % self.kv.block_size

    # ---- embeddings ------------------------------------------------------------------------------
    def embed_chunk(self, chunk: Chunk) -> torch.Tensor:
        """Token embeddings of a chunk (T, D), with its audio positions taken from its windows' embeddings (only
        the windows this chunk holds are looked up or encoded: a cached prefix needs none of its audio)."""
        seq, model = chunk.seq, self.model
        ids = torch.tensor(seq.token_ids[chunk.start: chunk.stop], device=model.device)
        embeds = model.language_model.model.embed_tokens(ids)
        if seq.audio_embeds is None:
            self.check_audio(seq)
            seq.audio_embeds = {}
        needed = [i for i, (a, z, _) in enumerate(seq.audio_runs) if a < chunk.stop and z > chunk.start]
        missing = [i for i in needed if i not in seq.audio_embeds]
        if missing:
            for i, emb in zip(missing, self.encode(seq.prompt, missing)):
                a, z, _ = seq.audio_runs[i]
                if len(emb) != z - a:
                    raise AudioTokenMismatch(f"audio window {i + 1} gives {len(emb)} embeddings for {z - a} "
                                             f"<|AUDIO|> tokens")
                seq.audio_embeds[i] = emb.to(model.dtype)
        for i in needed:
            a, z, _ = seq.audio_runs[i]
            lo, hi = max(a, chunk.start), min(z, chunk.stop)
            embeds[lo - chunk.start: hi - chunk.start] = seq.audio_embeds[i][lo - a: hi - a]
        return embeds

    def check_audio(self, seq: Sequence) -> None:
        """Every <|AUDIO|> position belongs to one window's run, and every window has its run."""
        n_slots = seq.prompt.ids.count(self.model.config.audio_token_index)
        in_runs = sum(z - a for a, z, _ in seq.audio_runs)
        if n_slots != in_runs or len(seq.audio_runs) != len(seq.prompt.windows):
            raise AudioTokenMismatch(f"audio and audio tokens do not match: {n_slots} <|AUDIO|> tokens in the prompt, "
                                     f"{len(seq.prompt.windows)} audio windows (was the prompt truncated inside an "
                                     f"audio block?)")

    def encode(self, prompt: PromptInputs, which: list[int] | None = None) -> list[torch.Tensor] | None:
        """Audio embeddings of the windows `which` (default all); only those missing from the cache go through the
        tower."""
        if not prompt.windows:
            return None
        which = range(len(prompt.windows)) if which is None else which
        keys = [prompt.keys[i] for i in which]
        out = [self.audio_cache.get(key) for key in keys]
        missing = [j for j, e in enumerate(out) if e is None]
        if missing:
            feats, frame_mask = log_mel_spectrogram([prompt.windows[which[j]] for j in missing], self.n_mels,
                                                    device=self.model.device)
            for j, emb in zip(missing, self.model.encode_audio(feats, frame_mask)):
                out[j] = emb.clone()  # a view would keep the whole padded batch alive in the cache
                self.audio_cache.put(keys[j], out[j])
            self.counters["audio_windows_encoded"] += len(missing)
        return out

    def stats(self) -> dict:
        return {"audio_cache_hits": self.audio_cache.hits, "audio_cache_misses": self.audio_cache.misses,
                "audio_cache_entries": len(self.audio_cache), "audio_cache_bytes": self.audio_cache.bytes}
