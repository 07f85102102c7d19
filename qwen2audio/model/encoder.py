"""The Whisper-style audio tower of Qwen2-Audio, plus its 2x average pooling.

Unlike the reference, which always runs 1500 positions (30 s) and masks padding as keys, this encoder
runs only over the valid frames of the longest clip in the batch (plus the one frame conv needs).
Key masking makes the valid outputs identical: padded positions never influence valid ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AudioConfig


class EncoderAttention(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        d = cfg.d_model
        self.num_heads, self.head_dim = cfg.encoder_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d, bias=False)  # Whisper's k has no bias
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape  # (B, T, D)
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # bidirectional
        return self.out_proj(out.transpose(1, 2).reshape(B, T, -1))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn = EncoderAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


def conv_output_lengths(mel_frames: torch.Tensor) -> torch.Tensor:
    """Encoder positions after conv2 (stride 2) for `mel_frames` valid frames."""
    return (mel_frames - 1) // 2 + 1


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # Whisper's sinusoids, stored in the checkpoint and loaded, never regenerated.
        self.embed_positions = nn.Embedding(cfg.max_source_positions, d)
        self.embed_positions.requires_grad_(False)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, features: torch.Tensor, mel_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, n_mels, T>=needed) and valid mel frames (B,) -> (B, N, D) audio states and N (B,) lengths."""
        positions = conv_output_lengths(mel_frames)  # (B,)
        n = int(positions.max())
        # Conv2 output n-1 reads conv1 output 2n-1, which reads mel frame 2n: keep 2n+1 frames.
        crop = min(features.shape[-1], 2 * n + 1, self.cfg.max_mel_frames)
        x = features[..., :crop].to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))[..., :n].transpose(1, 2)  # (B, n, D)
        x = x + self.embed_positions.weight[:n]

        key_mask = None
        if bool((positions != n).any()):  # mixed lengths: padded positions must not be attended to
            valid = torch.arange(n, device=x.device)[None, :] < positions.to(x.device)[:, None]
            key_mask = valid[:, None, None, :]  # (B, 1, 1, n)
        for layer in self.layers:
            x = layer(x, key_mask)

        # AvgPool1d(2, 2) over time; an odd last position is dropped, as the reference does.
        tokens = positions // 2
        m = n // 2
        x = x[:, : 2 * m].reshape(x.shape[0], m, 2, -1).mean(dim=2)
        return self.layer_norm(x), tokens
