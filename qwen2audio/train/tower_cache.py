"""Outputs of a frozen audio encoder, computed once per audio window and reused on later epochs.

With the audio tower frozen (the paper's SFT and DPO, and our pre-training) its output for a clip never
changes, yet every epoch would encode the clip again: about a fifth of a pre-training step with Whisper
tiny.en on CPU, a third with base. The cache wraps the tower's forward on the model instance (the
module tree, its state dict and checkpoints stay as they are) and keys each row by a hash of its valid
log-mel frames, so it needs no bookkeeping of which file a row came from and can never return the
states of other audio. Rows it has not seen are encoded together, as one smaller batch.

States are kept on the CPU, in bf16 when the forward runs under bf16 autocast (the projector would cast
them to bf16 anyway), up to a byte budget; past it, new windows are encoded every time.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


class TowerCache:
    def __init__(self, tower: nn.Module, max_bytes: int):
        self.tower_forward = tower.forward  # the bound original
        self.weights_dtype = next(tower.parameters()).dtype
        self.max_bytes = max_bytes
        self.states: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    @classmethod
    def install(cls, tower: nn.Module, max_bytes: int) -> "TowerCache":
        """Route `tower`'s forward through a new cache (the tower must be frozen)."""
        if any(p.requires_grad for p in tower.parameters()):
            raise RuntimeError("only a frozen audio tower's outputs can be cached")  # the loop's invariant, not a user's
        cache = cls(tower, max_bytes)
        tower.forward = cache.forward  # an instance attribute: nn.Module.__call__ finds it first
        return cache

    @staticmethod
    def _key(features: torch.Tensor, frames: int) -> bytes:
        row = features[:, :frames].detach().to("cpu", torch.float32).contiguous()
        return hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest() + frames.to_bytes(4, "little")

    def _store_dtype(self, device: torch.device) -> torch.dtype:
        """bf16 under bf16 autocast (the projector casts to it anyway); under other autocast float32,
        what the tower's last LayerNorm returns; without autocast the weights' dtype."""
        if not torch.is_autocast_enabled(device.type):
            return self.weights_dtype
        return torch.bfloat16 if torch.get_autocast_dtype(device.type) == torch.bfloat16 else torch.float32

    def forward(self, features: torch.Tensor, mel_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        frames = [int(f) for f in mel_frames.tolist()]
        keys = [self._key(features[i], f) for i, f in enumerate(frames)]
        found = {i: self.states[k] for i, k in enumerate(keys) if k in self.states}
        missing = [i for i in range(len(keys)) if i not in found]
        self.hits, self.misses = self.hits + len(found), self.misses + len(missing)
        store = self._store_dtype(features.device)
        if missing:
            index = torch.tensor(missing, device=features.device)
            states, lengths = self.tower_forward(features.index_select(0, index), mel_frames.index_select(0, index))
            for j, i in enumerate(missing):
                row = states[j, : int(lengths[j])].detach().to("cpu", store)
                found[i] = row
                if keys[i] not in self.states and self.bytes + row.nbytes <= self.max_bytes:
                    self.states[keys[i]] = row
                    self.bytes += row.nbytes
        rows = [found[i].to(store) for i in range(len(keys))]
        lengths = torch.tensor([r.shape[0] for r in rows], device=mel_frames.device)
        out = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        return out.to(features.device), lengths
