"""Qwen2-Audio: audio tower -> projector -> audio embeddings placed at the <|AUDIO|> tokens -> Qwen2."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import Qwen2AudioConfig
from ..errors import AudioTokenMismatch, Qwen2AudioError
from ..weights import LM_HEAD, CheckpointError, check_directory, read_checkpoint, write_checkpoint
from .encoder import AudioEncoder
from .qwen2 import Qwen2ForCausalLM, rope_tables


class MultiModalProjector(nn.Module):
    def __init__(self, cfg: Qwen2AudioConfig):
        super().__init__()
        self.linear = nn.Linear(cfg.audio_config.d_model, cfg.text_config.hidden_size, bias=True)

    def forward(self, x):
        return self.linear(x)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)


def attention_mask_4d(key_mask: torch.Tensor) -> torch.Tensor:
    """Causal + padding mask (B, 1, T, T), True = may attend.

    key_mask (B, T) marks real tokens. Each query also sees itself, so that a padding row never has every key
    masked (SDPA would give NaN, and NaN K/V would leak through 0 weights).
    """
    T = key_mask.shape[1]
    pos = torch.arange(T, device=key_mask.device)
    causal = pos[None, :] <= pos[:, None]  # (T, T)
    mask = causal[None] & key_mask[:, None, :].bool()
    mask |= (pos[None, :] == pos[:, None])[None]
    return mask[:, None]


def positions_from_mask(key_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding gets 0)."""
    return (key_mask.long().cumsum(-1) - 1).clamp(min=0)


class Qwen2AudioModel(nn.Module):
    """Same parameter names as transformers' Qwen2AudioForConditionalGeneration (released layout)."""

    use_cuda_graphs = True  # the engine replays decode steps as CUDA graphs on a GPU (engine/cuda_graphs.py)

    def __init__(self, cfg: Qwen2AudioConfig):
        super().__init__()
        self.config = cfg
        self.audio_tower = AudioEncoder(cfg.audio_config)
        self.multi_modal_projector = MultiModalProjector(cfg)
        self.language_model = Qwen2ForCausalLM(cfg.text_config)

    @property
    def device(self) -> torch.device:
        return self.multi_modal_projector.linear.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.multi_modal_projector.linear.weight.dtype

    # ---- pieces: the engine encodes audio with encode_audio; the forward composes all three --------
    def encode_audio(self, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> list[torch.Tensor]:
        """(A, n_mels, T) features + (A, T) frame mask -> per-audio embeddings [(N_a, hidden)]."""
        frames = feature_attention_mask.sum(-1).to(self.device)
        states, lengths = self.audio_tower(input_features.to(self.device), frames)
        embeds = self.multi_modal_projector(states)
        return [embeds[i, : int(n)] for i, n in enumerate(lengths.tolist())]

    def embed(self, input_ids: torch.Tensor, audio_embeds: list[torch.Tensor] | torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with audio embeddings written, in order, over the <|AUDIO|> positions."""
        embeds = self.language_model.model.embed_tokens(input_ids.to(self.device))
        is_audio = input_ids.to(self.device) == self.config.audio_token_index
        n_slots = int(is_audio.sum())
        if audio_embeds is None or len(audio_embeds) == 0:
            if n_slots:
                raise AudioTokenMismatch(f"the prompt has {n_slots} <|AUDIO|> tokens but no audio was given")
            return embeds
        flat = torch.cat(list(audio_embeds)) if isinstance(audio_embeds, (list, tuple)) else audio_embeds
        if flat.shape[0] != n_slots:
            raise AudioTokenMismatch(
                f"audio features and audio tokens do not match: {n_slots} <|AUDIO|> tokens in the prompt, "
                f"{flat.shape[0]} audio embeddings (was the prompt truncated inside an audio block?)"
            )
        return embeds.masked_scatter(is_audio[..., None], flat.to(embeds.dtype))

    def decode(self, embeds, key_mask, positions=None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Run the LLM over embeds (B, T, D) given key_mask (B, T), no cache: logits (B, T, V), or (N, V) for the N
        positions where `keep` (B, T) is True."""
        if positions is None:
            positions = positions_from_mask(key_mask)
        hidden = self.language_model.model(embeds, positions, self._attention_mask(key_mask, embeds.dtype))
        if keep is not None:
            hidden = hidden[keep]
        return self.language_model.lm_head(hidden)

    @staticmethod
    def _attention_mask(key_mask: torch.Tensor, dtype: torch.dtype):
        """The cheapest mask SDPA needs: "causal" without padding, else one additive float mask shared by all
        layers (SDPA would convert a bool one per layer)."""
        if bool(key_mask.all()):
            return "causal"
        allowed = attention_mask_4d(key_mask)
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    # ---- the Hugging Face-compatible forward ----------------------------------------------------
    def forward(self, input_ids, attention_mask=None, input_features=None, feature_attention_mask=None,
                position_ids=None, logits_mask=None, **unused) -> ModelOutput:
        """Logits for every position. Like the reference, positions default to 0..T-1 on every row
        (pass `position_ids` for left-padded batches). `logits_mask` (B, T) bool
        keeps only the positions marked True, as (N, vocab) in row-major order: training needs logits only
        where a target is predicted, and the vocabulary-wide lm_head is the largest matmul of a short step."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=self.device).expand(input_ids.shape[0], -1)
        limit = self.config.text_config.max_position_embeddings
        if int(position_ids.max()) >= limit:
            raise Qwen2AudioError(f"sequence of {int(position_ids.max()) + 1} positions exceeds max_position_embeddings={limit}")
        audio = None
        if input_features is not None:
            if feature_attention_mask is None:
                raise Qwen2AudioError("input_features given without feature_attention_mask")
            audio = self.encode_audio(input_features, feature_attention_mask)
        embeds = self.embed(input_ids, audio)
        keep = None if logits_mask is None else logits_mask.to(self.device)
        return ModelOutput(logits=self.decode(embeds, attention_mask.to(self.device), positions=position_ids.to(self.device),
                                              keep=keep))

    # ---- checkpoints ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device="cpu", dtype: torch.dtype | None = None,
                        progress: bool = False) -> "Qwen2AudioModel":
        """Build on the meta device, then assign the memory-mapped tensors weights.py reads (no double allocation);
        strict: missing, unexpected or misshapen tensors are a CheckpointError naming them."""
        directory = check_directory(path)
        cfg = Qwen2AudioConfig.from_file(directory)
        state = read_checkpoint(directory, device=device, dtype=dtype, progress=progress)
        with torch.device("meta"):
            model = cls(cfg)
        expected = set(model.state_dict())
        # transformers 4.x tied on text_config's flag, 5.x on the top-level one (and in practice never for
        # Qwen2-Audio, storing lm_head anyway). So: a stored lm_head that differs from the embeddings wins.
        tie_flag = cfg.text_config.tie_word_embeddings or bool(cfg.extra.get("tie_word_embeddings"))
        embed = state.get("language_model.model.embed_tokens.weight")
        # Re-tie when the stored lm_head is just the tied copy (as we write it), so training keeps them one.
        tied = tie_flag and (LM_HEAD not in state or (embed is not None and torch.equal(state[LM_HEAD], embed)))
        if tied:
            state.pop(LM_HEAD, None)
            expected.discard(LM_HEAD)
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"{directory}: weights do not match the config"
                + (f"; missing {len(missing)}: {_short(missing)}" if missing else "")
                + (f"; unexpected {len(unexpected)}: {_short(unexpected)}" if unexpected else "")
            )
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(model.get_parameter(name).shape):
                raise CheckpointError(f"{directory}: {name} has shape {tuple(tensor.shape)}, config implies "
                                      f"{tuple(model.get_parameter(name).shape)}")
        model.load_state_dict(state, strict=False, assign=True)
        if tied:
            model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
        # Non-persistent buffers (RoPE tables) were created on meta: rebuild them for real.
        t = cfg.text_config
        cos, sin = rope_tables(t.head_dim, t.max_position_embeddings, t.rope_theta)
        lm = model.language_model.model
        lm.rope_cos, lm.rope_sin = cos.to(device), sin.to(device)
        return model.eval()

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30):
        """config.json + safetensors shards in the released layout; lm_head is always written (a copy when
        tied), so that every transformers version reads it right."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        state = {}
        for name, tensor in self.state_dict(keep_vars=False).items():
            t = tensor.detach().clone() if name == LM_HEAD else tensor.detach()
            state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        write_checkpoint(state, directory, max_shard_bytes=max_shard_bytes)


def _short(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")
