"""Decode any audio input to what Qwen2-Audio consumes: 16 kHz mono float32 numpy.

Accepted inputs: a path (str / pathlib.Path), the bytes of an encoded file, a numpy
array or torch tensor (1-D, or 2-D with channels on the smaller dimension), or an
``(array, sample_rate)`` tuple.  Every user-facing failure is an ``AudioError`` whose
message starts with the input's label, so a batch of requests can be debugged.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import pathlib

import numpy as np
import soundfile as sf
import soxr

from .errors import Qwen2AudioError

SAMPLE_RATE = 16000
# Mel frames use a 160-sample hop and the encoder halves the frame count twice
# (conv stride 2, then pooling): 320 samples or fewer give 0 audio tokens.
MIN_SAMPLES = 321

# Integer PCM is scaled to [-1, 1] the way soundfile/ffmpeg do it.
_INT_SCALE = {
    np.dtype(np.int8): (0.0, 128.0),
    np.dtype(np.uint8): (128.0, 128.0),
    np.dtype(np.int16): (0.0, 32768.0),
    np.dtype(np.int32): (0.0, 2.0**31),
}


class AudioError(Qwen2AudioError):
    """An audio input could not be turned into a usable 16 kHz mono waveform."""


class AudioTooLong(AudioError):
    """The audio is longer than the caller's `max_seconds`; raised while decoding, before the rest is read."""

    def __init__(self, message: str, max_seconds: float):
        super().__init__(message)
        self.max_seconds = max_seconds


def _label(source, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<bytes, {memoryview(source).nbytes} bytes>"
    if isinstance(source, (np.ndarray, np.generic, tuple, list)) or _is_tensor(source):
        return "<array>"
    return f"<{type(source).__name__}>"


def _is_tensor(x) -> bool:
    # Checked by module name so that torch is not imported just to test a type.
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def _check_rate(sr, label: str) -> float:
    if isinstance(sr, bool) or not isinstance(sr, numbers.Real) or not math.isfinite(sr) or sr <= 0:
        raise AudioError(f"{label}: sampling rate must be a positive number, got {sr!r}")
    return sr


def _to_float_mono(x, label: str) -> np.ndarray:
    """Array-like (1-D or 2-D, any channel orientation) -> 1-D float32 in [-1, 1]."""
    if _is_tensor(x):
        t = x.detach().cpu()
        x = (t.float() if t.is_floating_point() else t).numpy()  # bfloat16 has no numpy dtype
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise AudioError(f"{label}: cannot convert input to an array ({e})") from None
    if arr.dtype in _INT_SCALE:
        offset, scale = _INT_SCALE[arr.dtype]
        arr = (arr.astype(np.float32) - offset) / scale
    elif arr.dtype.kind == "f":
        arr = arr.astype(np.float32, copy=False)
    else:  # bool, int64 (ambiguous full scale), complex, object, strings...
        raise AudioError(f"{label}: unsupported sample dtype {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise AudioError(f"{label}: expected a 1-D or 2-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise AudioError(f"{label}: audio is empty (0 samples)")
    if arr.ndim == 2:
        # Channels are the smaller dimension: (2, N) and (N, 2) are both stereo.
        arr = arr.mean(axis=0 if arr.shape[0] <= arr.shape[1] else 1, dtype=np.float32)
    return arr


# Encoded files are decoded block by block: each block is downmixed, checked and resampled to 16 kHz at
# once, so memory holds the 16 kHz result plus one block, and a `max_seconds` cap stops the decoder as soon
# as it is passed. A 1 MB FLAC can hold hours of silence: checking the length after decoding it whole cost
# gigabytes and tens of seconds (issue 20). Streamed resampling equals the one-shot soxr.resample exactly.
BLOCK_FRAMES = 65536


class _Collector:
    """Mono float32 blocks at the file's rate -> 16 kHz, under an optional duration cap."""

    def __init__(self, sr: int, label: str, max_seconds: float | None):
        _check_rate(sr, label)
        self.label, self.max_seconds = label, max_seconds
        self.limit = None if max_seconds is None else math.floor(max_seconds * sr)  # frames at the file's rate
        self.sr, self.frames, self.blocks = sr, 0, []
        self.stream = None if sr == SAMPLE_RATE else soxr.ResampleStream(sr, SAMPLE_RATE, 1, dtype="float32",
                                                                         quality="HQ")

    def add(self, mono: np.ndarray) -> None:
        self.frames += mono.shape[0]
        if self.limit is not None and self.frames > self.limit:
            raise AudioTooLong(f"{self.label}: audio is longer than {self.max_seconds:g} s (stopped decoding "
                               f"there)", self.max_seconds)
        # Check before resampling: soxr would smear a single NaN over its whole filter length.
        if not np.isfinite(mono).all():
            raise AudioError(f"{self.label}: audio contains NaN or Inf values")
        self.blocks.append(mono if self.stream is None else self.stream.resample_chunk(mono))

    def finish(self) -> np.ndarray:
        if self.frames == 0:
            raise AudioError(f"{self.label}: audio is empty (0 samples)")
        if self.stream is not None:
            self.blocks.append(self.stream.resample_chunk(np.zeros(0, np.float32), last=True))
        return np.concatenate(self.blocks)


def _decode_soundfile(data, label: str, max_seconds: float | None) -> np.ndarray:
    with sf.SoundFile(data) as f:
        out = _Collector(f.samplerate, label, max_seconds)
        for block in f.blocks(BLOCK_FRAMES, dtype="float32", always_2d=True):  # (frames, channels)
            out.add(block.mean(axis=1, dtype=np.float32))
    return out.finish()


def _decode_av(data, label: str, max_seconds: float | None) -> np.ndarray:
    import av  # imported lazily: only needed for formats libsndfile cannot read

    with av.open(data, mode="r") as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        # Keep the native rate and layout (rate/layout None); only convert to planar
        # float, so downmixing is a plain channel average and resampling is soxr, as
        # for every other input (ffmpeg's own downmix uses a -3 dB matrix instead).
        resampler = av.AudioResampler(format="fltp")
        out = None
        for frame in container.decode(audio=0):
            out = out or _Collector(frame.sample_rate, label, max_seconds)
            for f in resampler.resample(frame):
                out.add(f.to_ndarray().mean(axis=0, dtype=np.float32))  # (channels, n) -> (n,)
        for f in resampler.resample(None) if out else []:  # flush
            out.add(f.to_ndarray().mean(axis=0, dtype=np.float32))
    if out is None:
        raise AudioError(f"{label}: audio is empty (0 samples)")
    return out.finish()


def _decode(src, label: str, max_seconds: float | None) -> np.ndarray:
    """Encoded file (path or bytes) -> 16 kHz mono float32; soundfile, then PyAV."""
    opener = (lambda: io.BytesIO(src)) if isinstance(src, bytes) else (lambda: src)
    try:
        return _decode_soundfile(opener(), label, max_seconds)
    except AudioError:  # decodable, but too long, empty or not finite: the verdict stands
        raise
    except Exception as e:  # libsndfile does not know m4a/aac/webm/...: try ffmpeg
        sf_err = e
    try:
        return _decode_av(opener(), label, max_seconds)
    except AudioError:
        raise
    except Exception as e:
        # Short library reasons only (soundfile's str() embeds a BytesIO repr).
        sf_msg = getattr(sf_err, "error_string", None) or sf_err
        av_msg = getattr(e, "strerror", None) or e
        raise AudioError(f"{label}: cannot decode audio (soundfile: {sf_msg}; av: {av_msg})") from e


def load_audio(source, sampling_rate: int | None = None, *, name: str | None = None,
               max_seconds: float | None = None) -> np.ndarray:
    """Return ``source`` as contiguous 1-D float32 at 16 kHz mono.

    ``sampling_rate`` is the rate of an array/tensor input (default 16000); it is
    ignored for encoded files, whose header carries the rate, and for tuples.
    ``max_seconds``: raise AudioTooLong for longer audio; an encoded file is decoded only
    up to that point, so memory and time stay bounded whatever its header claims.
    """
    label = _label(source, name)
    if sampling_rate is not None:
        _check_rate(sampling_rate, label)

    if isinstance(source, (str, os.PathLike)):
        path = pathlib.Path(source)
        if not path.exists():
            raise AudioError(f"{label}: file not found")
        if path.is_dir():
            raise AudioError(f"{label}: is a directory, not an audio file")
        wav = _decode(str(path), label, max_seconds)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise AudioError(f"{label}: empty input")
        wav = _decode(data, label, max_seconds)
    else:  # an array the caller already holds: checked and resampled whole
        if isinstance(source, tuple):
            if len(source) != 2:
                raise AudioError(f"{label}: expected an (array, sample_rate) tuple, got {len(source)} items")
            arr, sr = _to_float_mono(source[0], label), _check_rate(source[1], label)
        elif isinstance(source, (np.ndarray, np.generic, list)) or _is_tensor(source):
            arr, sr = _to_float_mono(source, label), sampling_rate or SAMPLE_RATE
        else:
            raise AudioError(f"{label}: unsupported audio input type {type(source).__name__}")
        out = _Collector(sr, label, max_seconds)
        out.add(arr)
        wav = out.finish()

    if wav.shape[0] < MIN_SAMPLES:
        raise AudioError(
            f"{label}: audio is too short ({wav.shape[0] / SAMPLE_RATE:.3f} s, {wav.shape[0]} samples "
            f"at 16 kHz); need at least {MIN_SAMPLES / SAMPLE_RATE:.2f} s ({MIN_SAMPLES} samples)"
        )
    return np.ascontiguousarray(wav, dtype=np.float32)


def audio_duration(wav: np.ndarray) -> float:
    """Duration in seconds of a 16 kHz waveform as returned by ``load_audio``."""
    return wav.shape[-1] / SAMPLE_RATE
