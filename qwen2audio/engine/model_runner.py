"""The engine's tensor side: KV-cache rows, CUDA graphs, the encoded-audio cache, and the model calls.

`ModelRunner` turns requests into tensors and tensors into logits; it knows nothing of sampling, text or
request lifetimes (llm_engine.py). The KV cache has one fixed row of `max_len` positions per running request
(scheduler.py keeps the running requests in rows 0..B-1).
"""

from __future__ import annotations

from collections import Counter

import torch

from ..features import log_mel_spectrogram
from ..model.qwen2_audio import Qwen2AudioModel
from .audio_cache import AudioEmbeddingCache
from .cuda_graphs import DecodeGraphs, enabled
from .inputs import PromptInputs
from .scheduler import Sequence


def kv_bytes_per_token(model: Qwen2AudioModel) -> int:
    t = model.config.text_config
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * model.dtype.itemsize


class ModelRunner:
    def __init__(self, model: Qwen2AudioModel, slots: int, max_len: int, pad_id: int, counters: Counter,
                 audio_cache_bytes: int, n_mels: int):
        self.model = model
        self.pad_id = pad_id
        self.n_mels = n_mels
        self.counters = counters  # the engine's statistics; this side counts encoded audio windows
        self.cache = model.new_cache(slots, max_len)  # (layers, slots, kv_heads, max_len, head_dim)
        self.kv_cache_bytes = 2 * self.cache.k.numel() * self.cache.k.element_size()
        self.graphs = DecodeGraphs(model, self.cache) if enabled(model) else None  # CUDA: decode steps as graphs
        self.audio_cache = AudioEmbeddingCache(audio_cache_bytes)

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """The prompts of requests in consecutive rows, right-padded into one batch, each written into its own
        cache row and attending only to its own tokens -> the logits (n, V) float32 at each prompt's end."""
        model, device = self.model, self.model.device
        lengths = [s.prompt_len for s in seqs]
        ids = torch.full((len(seqs), max(lengths)), self.pad_id, dtype=torch.long)
        audio = []
        for i, s in enumerate(seqs):
            ids[i, : lengths[i]] = torch.tensor(s.prompt.ids)
            audio += self.encode(s.prompt) or []
        ids = ids.to(device)
        ends = torch.tensor(lengths, device=device)
        key_mask = torch.arange(ids.shape[1], device=device)[None, :] < ends[:, None]
        embeds = model.embed(ids, audio or None)
        rows = self.cache.rows(seqs[0].row, seqs[0].row + len(seqs))
        return model.decode(embeds, key_mask, rows, offset=0, at=ends - 1)[:, -1].float()

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for every running row (rows 0..B-1); row i writes at position pos_i and reads keys
        0..pos_i -> logits (B, V) float32."""
        device = self.model.device
        positions = [s.pos for s in seqs]
        pos = torch.tensor(positions, device=device)
        span = max(positions) + 1
        tokens = torch.tensor([s.last_token for s in seqs], device=device)
        if self.graphs is not None:
            return self.graphs(tokens, pos, pos, torch.arange(span, device=device)[None, :] <= pos[:, None]).float()
        mask = None  # rows at one common position see exactly their own keys: no mask needed
        if min(positions) != span - 1:
            beyond = torch.arange(span, device=device)[None, :] > pos[:, None]  # (B, span)
            mask = torch.zeros(beyond.shape, dtype=self.model.dtype, device=device).masked_fill_(beyond, float("-inf"))
            mask = mask[:, None, None, :]  # (B, 1, 1, span)
        return self.model.decode_rows(tokens, pos, mask, self.cache, span).float()  # (B, V)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` keys/values of row `src` into row `dst`."""
        self.cache.k[:, dst, :, :length] = self.cache.k[:, src, :, :length]
        self.cache.v[:, dst, :, :length] = self.cache.v[:, src, :, :length]

    def encode(self, prompt: PromptInputs) -> list[torch.Tensor] | None:
        """Audio embeddings per window; only windows missing from the cache go through the tower."""
        if not prompt.windows:
            return None
        out = [self.audio_cache.get(key) for key in prompt.keys]
        missing = [i for i, e in enumerate(out) if e is None]
        if missing:
            feats, frame_mask = log_mel_spectrogram([prompt.windows[i] for i in missing], self.n_mels,
                                                    device=self.model.device)
            for i, emb in zip(missing, self.model.encode_audio(feats, frame_mask)):
                out[i] = emb.clone()  # a view would keep the whole padded batch alive in the cache
                self.audio_cache.put(prompt.keys[i], out[i])
            self.counters["audio_windows_encoded"] += len(missing)
        return out

    def stats(self) -> dict:
        return {"audio_cache_hits": self.audio_cache.hits, "audio_cache_misses": self.audio_cache.misses,
                "audio_cache_entries": len(self.audio_cache), "audio_cache_bytes": self.audio_cache.bytes}
