"""Whisper-style log-mel features, as Qwen2-Audio's reference feature extractor computes them.

Batched and in torch (CPU or GPU). Every constant is named once, with its derivation.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop
CHUNK_LENGTH = 30  # seconds the encoder sees at once
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples per window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
N_FREQS = N_FFT // 2 + 1  # 201 STFT bins
LOG_FLOOR = 1e-10  # clamp before log10
DYNAMIC_RANGE = 8.0  # log10 units kept below each clip's maximum (80 dB)


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's htk=False)."""
    freq = np.asarray(freq, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    mels = freq / f_sp
    above = freq >= min_log_hz
    mels[above] = min_log_mel + np.log(freq[above] / min_log_hz) / logstep
    return mels


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, math.log(6.4) / 27.0
    freq = mels * f_sp
    above = mels >= min_log_mel
    freq[above] = min_log_hz * np.exp(logstep * (mels[above] - min_log_mel))
    return freq


@lru_cache(maxsize=None)
def mel_filters(n_mels: int) -> np.ndarray:
    """(n_mels, N_FREQS) Slaney-normalised triangular filters over 0-8000 Hz (Whisper's mel_{80,128})."""
    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, N_FREQS)
    mel_points = np.linspace(_hz_to_mel(np.array([0.0]))[0], _hz_to_mel(np.array([SAMPLE_RATE / 2]))[0], n_mels + 2)
    hz_points = _mel_to_hz(mel_points)
    widths = np.diff(hz_points)
    ramps = hz_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (hz_points[2:] - hz_points[:-2]))[:, None]  # Slaney norm: equal area per filter
    return weights.astype(np.float32)


def num_valid_frames(num_samples: int) -> int:
    """Mel frames that hold real audio: ceil(samples / hop), at most one window."""
    return min(N_FRAMES, -(-num_samples // HOP_LENGTH))


def num_audio_tokens(num_frames: int | torch.Tensor):
    """Audio tokens the encoder emits for `num_frames` valid mel frames (conv stride 2, then pool 2)."""
    after_conv = (num_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def log_mel_spectrogram(
    waveforms: list[np.ndarray], n_mels: int = 128, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-mel features of up-to-30 s 16 kHz clips, each zero-padded to 30 s like the reference.

    Returns features (B, n_mels, N_FRAMES) float32 and the frame mask (B, N_FRAMES) int64.
    """
    batch = torch.zeros(len(waveforms), N_SAMPLES, dtype=torch.float32)
    mask = torch.zeros(len(waveforms), N_FRAMES, dtype=torch.long)
    for i, wav in enumerate(waveforms):
        wav = torch.as_tensor(np.asarray(wav, dtype=np.float32)[:N_SAMPLES])
        batch[i, : wav.numel()] = wav
        mask[i, : num_valid_frames(wav.numel())] = 1
    batch = batch.to(device)
    window = torch.hann_window(N_FFT, device=device)  # periodic, as in the reference
    stft = torch.stft(batch, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    # |z|^2 as re^2 + im^2: abs() would take a square root only to square it again.
    re_im = torch.view_as_real(stft[..., :-1])  # (B, N_FREQS, N_FRAMES, 2): the last frame is dropped
    power = re_im[..., 0].square() + re_im[..., 1].square()
    filters = torch.from_numpy(mel_filters(n_mels)).to(device)
    log_spec = (filters @ power).clamp_(min=LOG_FLOOR).log10_()
    # The floor is relative to each clip's peak over the whole padded window, exactly as the reference.
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - DYNAMIC_RANGE).add_(4.0).div_(4.0)
    return log_spec, mask.to(device)


def split_windows(wav: np.ndarray, truncate: bool = False, min_samples: int = 321) -> list[np.ndarray]:
    """Cut a clip into consecutive 30 s windows (the reference silently keeps only the first).

    A trailing window too short to give any audio token is dropped; `truncate=True` mimics the
    reference's cut to the first 30 s.
    """
    if truncate or len(wav) <= N_SAMPLES:
        return [wav[:N_SAMPLES]]
    windows = [wav[start : start + N_SAMPLES] for start in range(0, len(wav), N_SAMPLES)]
    if len(windows[-1]) < min_samples:
        windows.pop()
    return windows
