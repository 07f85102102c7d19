"""Music: short melodies written as MIDI here and rendered by fluidsynth with a General MIDI
soundfont, labelled with the instrument (the GM program), the key and the tempo.

The MIDI writer is the few dozen lines format 0 needs (one track, one channel), so no MIDI
package is required.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from . import dsp
from .errors import MissingToolError, SynthError, require_program

SOUNDFONTS = ("/usr/share/sounds/sf2/TimGM6mb.sf2", "/usr/share/sounds/sf2/FluidR3_GM.sf2")
SOUNDFONT_PACKAGE = "timgm6mb-soundfont"
TICKS_PER_BEAT = 480
DRUM_CHANNEL = 9  # GM percussion is MIDI channel 10

# label -> (GM program number, lowest and highest MIDI note the melody may use)
INSTRUMENTS = {
    "piano": (0, 48, 84), "electric piano": (4, 48, 79), "harpsichord": (6, 48, 79), "glockenspiel": (9, 72, 96),
    "vibraphone": (11, 53, 84), "marimba": (12, 48, 79), "church organ": (19, 36, 79), "accordion": (21, 53, 81),
    "acoustic guitar": (24, 40, 76), "electric guitar": (27, 40, 76), "bass guitar": (33, 28, 55),
    "violin": (40, 55, 88), "cello": (42, 36, 67), "harp": (46, 36, 84), "string ensemble": (48, 43, 79),
    "choir": (52, 48, 76), "trumpet": (56, 55, 82), "trombone": (57, 40, 70), "french horn": (60, 41, 72),
    "saxophone": (65, 49, 80), "oboe": (68, 58, 88), "clarinet": (71, 50, 84), "flute": (73, 60, 91),
    "pan flute": (75, 60, 91), "sitar": (104, 48, 77), "banjo": (105, 48, 76), "steel drums": (114, 55, 84),
    "drums": (None, 0, 0),
}
NOTE_NAMES = ["C", "C sharp", "D", "E flat", "E", "F", "F sharp", "G", "A flat", "A", "B flat", "B"]
SCALES = {"major": [0, 2, 4, 5, 7, 9, 11], "minor": [0, 2, 3, 5, 7, 8, 10]}  # natural minor
KICK, SNARE, HIHAT = 36, 38, 42


def find_soundfont(path: str | None = None) -> str:
    if path:
        if not Path(path).is_file():
            raise SynthError(f"soundfont not found: {path}")
        return path
    for candidate in SOUNDFONTS:
        if Path(candidate).is_file():
            return candidate
    raise MissingToolError(f"source 'music' needs a General MIDI soundfont: install it with "
                           f"'apt-get install {SOUNDFONT_PACKAGE}', or leave 'music' out of --sources")


def check_music(soundfont: str | None = None) -> str:
    require_program("fluidsynth", "fluidsynth", "music")
    return find_soundfont(soundfont)


def tempo_word(bpm: int) -> str:
    return "slow" if bpm < 85 else "moderate" if bpm < 125 else "fast"


def key_name(p: dict) -> str | None:
    return None if p["instrument"] == "drums" else f"{NOTE_NAMES[p['tonic']]} {p['mode']}"


def sample(rng: np.random.Generator, instrument: str) -> dict:
    """A melody (or a drum groove) of 3-6 s: notes as [start_beat, beats, midi_note, velocity]."""
    bpm = int(rng.integers(12, 37)) * 5  # 60..180 in steps of 5
    n_beats = int(np.clip(round(float(rng.uniform(3.0, 6.0)) * bpm / 60), 4, 16))
    p = {"instrument": instrument, "bpm": bpm, "beats": n_beats}
    program, low, high = INSTRUMENTS[instrument]
    notes = []
    if program is None:
        for beat in np.arange(0, n_beats, 0.5):
            notes.append([float(beat), 0.25, HIHAT, 70])
            if beat % 2 == 0:
                notes.append([float(beat), 0.5, KICK, 110])
            elif beat % 1 == 0:
                notes.append([float(beat), 0.5, SNARE, 100])
        p["notes"] = notes
        return p
    p["tonic"], p["mode"] = int(rng.integers(12)), str(rng.choice(list(SCALES)))
    # Scale notes inside the instrument's range; the melody starts and ends on a tonic, so the key
    # is audible, and moves mostly by step.
    pitches = [m for m in range(low, high + 1) if (m - p["tonic"]) % 12 in SCALES[p["mode"]]]
    tonics = [i for i, m in enumerate(pitches) if (m - p["tonic"]) % 12 == 0]
    index = tonics[len(tonics) // 2]
    beat = 0.0
    while beat < n_beats - 1:
        length = float(rng.choice([0.5, 1.0, 1.0, 2.0]))
        notes.append([beat, min(length, n_beats - 1 - beat), pitches[index], int(rng.integers(70, 111))])
        beat += length
        index = int(np.clip(index + rng.choice([-2, -1, -1, 1, 1, 2, 3]), 0, len(pitches) - 1))
    final = min(tonics, key=lambda i: abs(i - index))
    notes.append([float(n_beats - 1), 1.0, pitches[final], 100])
    p["notes"] = notes
    return p


def _varlen(value: int) -> bytes:
    """MIDI variable-length quantity: 7 bits per byte, high bit set on all but the last."""
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def midi_bytes(p: dict) -> bytes:
    """A format-0 standard MIDI file of the parameters from `sample`."""
    program = INSTRUMENTS[p["instrument"]][0]
    channel = DRUM_CHANNEL if program is None else 0
    events = []  # (tick, order, bytes): note-offs sort before note-ons at the same tick
    for start, length, note, velocity in p["notes"]:
        on, off = int(start * TICKS_PER_BEAT), int((start + length) * TICKS_PER_BEAT) - 1
        events.append((on, 1, bytes([0x90 | channel, note, velocity])))
        events.append((off, 0, bytes([0x80 | channel, note, 0])))
    header = [(0, -1, b"\xff\x51\x03" + (60_000_000 // p["bpm"]).to_bytes(3, "big"))]  # tempo, us per beat
    if program is not None:
        header.append((0, -1, bytes([0xC0 | channel, program])))
    track, now = bytearray(), 0
    for tick, _, data in sorted(header + events, key=lambda e: (e[0], e[1])):
        track += _varlen(tick - now) + data
        now = tick
    track += _varlen(TICKS_PER_BEAT) + b"\xff\x2f\x00"  # a beat of release before the end of track
    return (b"MThd" + struct.pack(">IHHH", 6, 0, 1, TICKS_PER_BEAT)
            + b"MTrk" + struct.pack(">I", len(track)) + bytes(track))


def render(p: dict, soundfont: str) -> np.ndarray:
    """Render with fluidsynth (float output: 16-bit output would be dithered with noise) -> 16 kHz."""
    with tempfile.TemporaryDirectory(prefix="q2a-midi-") as tmp:
        mid, wav = Path(tmp) / "in.mid", Path(tmp) / "out.wav"
        mid.write_bytes(midi_bytes(p))
        command = ["fluidsynth", "-ni", "-q", "-r", str(dsp.SAMPLE_RATE), "-g", "0.6", "-T", "wav", "-O", "float",
                   "-F", str(wav), soundfont, str(mid)]
        try:
            subprocess.run(command, capture_output=True, check=True, timeout=120)
        except subprocess.CalledProcessError as e:
            reason = " ".join(e.stderr.decode(errors="replace").split())[:200]
            raise SynthError(f"fluidsynth failed (exit {e.returncode}): {reason}") from None
        audio = dsp.read_wav(wav)
    audio = dsp.trim_silence(audio, threshold_db=-50.0)
    if dsp.rms(audio) == 0.0:
        raise SynthError(f"fluidsynth rendered silence for {p['instrument']}")
    return dsp.normalize_peak(audio)


def chroma(wav: np.ndarray) -> np.ndarray:
    """Energy per pitch class (C=0 .. B=11) between 50 Hz and 4 kHz, for checking keys."""
    spectrum = np.abs(np.fft.rfft(wav)) ** 2
    freqs = np.fft.rfftfreq(wav.size, 1.0 / dsp.SAMPLE_RATE)
    keep = (freqs > 50) & (freqs < 4000)
    classes = np.round(12 * np.log2(freqs[keep] / 440.0) + 69).astype(int) % 12
    return np.bincount(classes, weights=spectrum[keep], minlength=12)
