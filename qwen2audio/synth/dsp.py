"""Signal helpers shared by the generators: wav I/O, resampling, noise, reverberation, mixing.

Everything is float32 mono at SAMPLE_RATE and pure numpy, driven by an explicit
`np.random.Generator`, so one item's audio depends only on its spec and seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from ..audio import SAMPLE_RATE

# Noise "colours" as the exponent of their power spectrum 1/f^alpha.
NOISE_ALPHA = {"white": 0.0, "pink": 1.0, "brown": 2.0, "blue": -1.0}
FADE_SECONDS = 0.01  # a 10 ms fade keeps generated edges from clicking


def seconds(n_samples: int) -> float:
    return n_samples / SAMPLE_RATE


def samples(duration: float) -> int:
    return int(round(duration * SAMPLE_RATE))


# ---- files -------------------------------------------------------------------------------------
def write_wav(path: str | Path, wav: np.ndarray) -> None:
    """16-bit PCM mono wav, written to a temporary name first so an interrupted build never
    leaves a truncated file that a resumed build would take for finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sf.write(tmp, np.clip(wav, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def read_wav(path: str | Path) -> np.ndarray:
    """A wav written by an external tool -> float32 mono at SAMPLE_RATE."""
    wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return resample(wav.mean(axis=1), sr)


def resample(wav: np.ndarray, sr: int, target: int = SAMPLE_RATE) -> np.ndarray:
    wav = np.asarray(wav, dtype=np.float32)
    if sr == target:
        return wav
    return soxr.resample(wav, sr, target, quality="HQ").astype(np.float32)


# ---- levels ------------------------------------------------------------------------------------
def rms(wav: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))) if wav.size else 0.0


def normalize_peak(wav: np.ndarray, peak_db: float = -1.0) -> np.ndarray:
    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    if peak == 0.0:
        return wav.astype(np.float32)
    return (wav * (10 ** (peak_db / 20) / peak)).astype(np.float32)


def fade(wav: np.ndarray, duration: float = FADE_SECONDS) -> np.ndarray:
    n = min(samples(duration), wav.size // 2)
    if n == 0:
        return wav
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    out = wav.astype(np.float32, copy=True)
    out[:n] *= ramp
    out[-n:] *= ramp[::-1]
    return out


def trim_silence(wav: np.ndarray, threshold_db: float = -45.0, pad: float = 0.1) -> np.ndarray:
    """Cut the leading/trailing silence TTS engines add (differently per engine, which would
    otherwise be a give-away of the engine), keeping `pad` seconds on each side."""
    peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    if peak == 0.0:
        return wav
    loud = np.flatnonzero(np.abs(wav) > peak * 10 ** (threshold_db / 20))
    start = max(0, loud[0] - samples(pad))
    end = min(wav.size, loud[-1] + 1 + samples(pad))
    return wav[start:end]


# ---- noise, reverberation, speed ---------------------------------------------------------------
def coloured_noise(rng: np.random.Generator, n: int, colour: str = "white") -> np.ndarray:
    """Unit-RMS noise whose power spectrum falls as 1/f^alpha (white 0, pink 1, brown 2, blue -1)."""
    alpha = NOISE_ALPHA[colour]
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE)
    freqs[0] = freqs[1] if n > 1 else 1.0  # no infinite gain at DC
    spectrum *= freqs ** (-alpha / 2)
    noise = np.fft.irfft(spectrum, n)
    return (noise / (rms(noise) or 1.0)).astype(np.float32)


def add_noise(wav: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """wav + noise scaled so that 10*log10(P_wav / P_noise) = snr_db."""
    scale = rms(wav) / (rms(noise) or 1.0) / 10 ** (snr_db / 20)
    return (wav + scale * noise[: wav.size]).astype(np.float32)


def impulse_response(rng: np.random.Generator, rt60: float, direct_ratio_db: float = 0.0) -> np.ndarray:
    """A synthetic room: a direct path plus exponentially decaying noise (60 dB down after rt60 s),
    the textbook statistical model of late reverberation."""
    n = max(samples(rt60), 2)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60)  # ln(1000) = 6.9078: -60 dB amplitude
    tail[0] = 0.0
    tail *= 10 ** (-direct_ratio_db / 20) / (np.sqrt(np.sum(tail**2)) or 1.0)
    tail[0] = 1.0
    return tail.astype(np.float32)


def convolve(wav: np.ndarray, ir: np.ndarray) -> np.ndarray:
    """Linear convolution by FFT, keeping the original length plus the reverberant tail."""
    n = wav.size + ir.size - 1
    size = 1 << (n - 1).bit_length()
    out = np.fft.irfft(np.fft.rfft(wav, size) * np.fft.rfft(ir, size), size)[:n]
    return out.astype(np.float32)


def change_speed(wav: np.ndarray, factor: float) -> np.ndarray:
    """Play `factor` times faster (pitch moves with it), as in speed-perturbation augmentation."""
    if abs(factor - 1.0) < 1e-6:
        return wav
    return soxr.resample(wav, SAMPLE_RATE * factor, SAMPLE_RATE, quality="HQ").astype(np.float32)


def augment(wav: np.ndarray, rng: np.random.Generator, aug: dict) -> np.ndarray:
    """Apply an augmentation spec {speed, rt60, noise, snr_db} (any key may be missing)."""
    if aug.get("speed"):
        wav = change_speed(wav, aug["speed"])
    if aug.get("rt60"):
        wav = convolve(wav, impulse_response(rng, aug["rt60"], aug.get("drr_db", 0.0)))
    if aug.get("noise"):
        wav = add_noise(wav, coloured_noise(rng, wav.size, aug["noise"]), aug["snr_db"])
    return wav


def mix(foreground: np.ndarray, background: np.ndarray, snr_db: float, offset: int) -> np.ndarray:
    """Foreground placed `offset` samples into the background, at `snr_db` over it (RMS of the
    overlapping part); the result is as long as the longer of the two."""
    fg_level = rms(foreground)
    n = max(background.size, offset + foreground.size)
    out = np.zeros(n, dtype=np.float32)
    bg = background[: n]
    overlap = bg[offset: offset + foreground.size]
    bg_level = rms(overlap) or rms(bg) or 1.0
    out[: bg.size] += bg * (fg_level / bg_level / 10 ** (snr_db / 20))
    out[offset: offset + foreground.size] += foreground
    return out


# ---- analysis (labels and tests) ---------------------------------------------------------------
def dominant_frequency(wav: np.ndarray) -> float:
    """Frequency in Hz of the strongest spectral peak (Hann window, parabolic interpolation)."""
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(wav.size)))
    k = int(np.argmax(spectrum[1:])) + 1
    if 1 <= k < spectrum.size - 1:
        a, b, c = np.log(spectrum[k - 1: k + 2] + 1e-12)
        k = k + 0.5 * (a - c) / (a - 2 * b + c)
    return float(k * SAMPLE_RATE / wav.size)
