"""Render one planned item to its wav file: a pure function of the spec (and the soundfont)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from . import asterisk, dsp, music, sounds, tts


def _sound_at_least(params: dict, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A mixture background sound, made long enough to lie under the whole command."""
    return sounds.render({**params, "duration": max(params["duration"], seconds)}, rng)


def _music_at_least(params: dict, seconds: float, soundfont: str) -> np.ndarray:
    """A mixture background melody, repeated until it is long enough."""
    once = music.render(params, soundfont)
    return np.tile(once, int(np.ceil(dsp.samples(seconds) / once.size)))


def mixture_parts(spec: dict, soundfont: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(command speech, background scaled to the spec's SNR and padded to the full length) of a
    mixture item; the mixture is their sum. Tests use this to check both parts are present."""
    rng = np.random.default_rng(spec["seed"])
    speech = tts.speak(spec["question"]["question"], spec["voice"])
    offset = dsp.samples(spec["offset"])
    needed = dsp.seconds(offset + speech.size) + 0.5  # the background also runs on after the command
    background = spec["background"]
    if "sound" in background:
        bg = _sound_at_least(background["sound"], needed, rng)
    else:
        bg = _music_at_least(background["music"], needed, soundfont)
    bg = bg[: dsp.samples(needed)]
    together = dsp.mix(speech, bg, spec["snr_db"], offset)
    scaled_bg = together.copy()
    scaled_bg[offset: offset + speech.size] -= speech
    placed = np.zeros_like(together)
    placed[offset: offset + speech.size] = speech
    return placed, scaled_bg


def render(spec: dict, soundfont: str | None = None) -> np.ndarray:
    """The item's final audio: float32 at 16 kHz with its peak at spec['gain_db'] dBFS."""
    kind = spec["kind"]
    rng = np.random.default_rng(spec["seed"])
    if kind in ("speech", "open"):
        wav = tts.speak(spec["text"], spec["voice"])
    elif kind == "chat":
        wav = tts.speak(spec["question"]["question"], spec["voice"])
    elif kind == "asterisk":
        wav = asterisk.load(spec["source_path"])
    elif kind == "sound":
        wav = sounds.render(spec["sound"], rng)
    elif kind == "music":
        wav = music.render(spec["music"], soundfont)
    elif kind == "mixture":
        speech, background = mixture_parts(spec, soundfont)
        wav = speech + background
    else:
        raise ValueError(f"unknown item kind {kind!r}")
    wav = dsp.augment(wav, rng, spec.get("aug") or {})
    return dsp.normalize_peak(wav, spec["gain_db"])


def existing_duration(path: Path) -> float | None:
    """Duration of an already written wav, or None when it is missing or unreadable."""
    try:
        info = sf.info(str(path))
    except Exception:  # any unreadable leftover is rendered again
        return None
    return info.duration if info.frames > 0 and info.samplerate == dsp.SAMPLE_RATE else None


def render_item(spec: dict, root: str, soundfont: str | None) -> tuple[str, float, bool]:
    """Worker entry: write the item's wav unless a readable one exists (resuming a build).
    Returns (id, duration in seconds, whether it was rendered now)."""
    path = Path(root) / spec["audio"]
    duration = existing_duration(path)
    if duration is not None:
        return spec["id"], duration, False
    wav = render(spec, soundfont)
    dsp.write_wav(path, wav)
    return spec["id"], dsp.seconds(wav.size), True
