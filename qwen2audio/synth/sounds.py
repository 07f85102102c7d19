"""Non-speech sounds generated in code, each with its label and the parameters that made it.

`sample(rng, name)` draws a parameter dict (kept in the item's spec, so labels such as a tone's
frequency or a count of beeps are checkable); `render(params, rng)` is a pure function of it.
The recipes are deliberately simple physical caricatures (a bell is decaying inharmonic
partials, rain is noise plus random droplets), distinct enough to be told apart by ear.
"""

from __future__ import annotations

import numpy as np

from . import dsp
from .dsp import SAMPLE_RATE, samples
from .sentences import number_words

# label -> caption templates; {n}, {freq}, {bpm}, {direction} come from the parameters.
CAPTIONS = {
    "tone": ["A steady {freq} Hz tone.", "A pure tone at {freq} hertz."],
    "beeps": ["{N} short beeps.", "An electronic device beeps {n} times."],
    "chirp": ["A {direction} chirp sweeping in pitch.", "A quick {direction} frequency sweep."],
    "siren": ["A {style} siren.", "An emergency vehicle siren, {style}."],
    "white noise": ["Steady white noise, like a harsh hiss.", "A constant hiss of white noise."],
    "pink noise": ["Pink noise, an even rushing sound.", "A soft steady rush of pink noise."],
    "brown noise": ["Brown noise, a deep low rumble.", "A dull rumbling noise."],
    "clicks": ["{N} sharp clicks.", "A series of {n} clicks."],
    "rain": ["Rain falling steadily.", "The patter of raindrops."],
    "wind": ["Wind blowing in gusts.", "A gusty wind howls."],
    "ocean waves": ["Ocean waves washing on the shore.", "Waves rolling in and out."],
    "dial tone": ["A telephone dial tone.", "The steady hum of a phone's dial tone."],
    "busy signal": ["A telephone busy signal.", "The repeating tone of a busy phone line."],
    "telephone ringing": ["A telephone ringing.", "A phone rings {n} times."],
    "alarm": ["A loud beeping alarm.", "An alarm beeps rapidly."],
    "heartbeat": ["A heartbeat at about {bpm} beats per minute.", "A slow, steady heartbeat."],
    "engine": ["The hum of an engine idling.", "A motor running steadily."],
    "bell": ["A bell rings {n} times.", "The ringing of a bell, struck {n} times."],
    "knocking": ["Someone knocks on a door {n} times.", "{N} knocks on a wooden door."],
    "keypad tones": ["Telephone keypad tones as a number is dialled.", "Touch-tone dialling sounds."],
}
LABELS = tuple(CAPTIONS)
COUNTED = {"beeps": "beeps", "clicks": "clicks", "bell": "bell strikes", "knocking": "knocks",
           "telephone ringing": "rings"}  # label -> what a "how many" question counts
DTMF_LOW, DTMF_HIGH = (697, 770, 852, 941), (1209, 1336, 1477)


def _t(duration: float) -> np.ndarray:
    return np.arange(samples(duration), dtype=np.float64) / SAMPLE_RATE


def _burst(duration: float, freqs, decay: float = 0.0) -> np.ndarray:
    t = _t(duration)
    wave = sum(np.sin(2 * np.pi * f * t) for f in freqs) / len(freqs)
    return dsp.fade(wave * (np.exp(-t / decay) if decay else 1.0))


def _sequence(parts: list[np.ndarray], gap: float, tail: float = 0.2) -> np.ndarray:
    silence = np.zeros(samples(gap))
    out = []
    for part in parts:
        out += [part, silence]
    return np.concatenate([np.zeros(samples(0.1)), *out[:-1], np.zeros(samples(tail))])


def _envelope(rng, n: int, rate_hz: float, depth: float) -> np.ndarray:
    """A slow random gain curve: interpolated random points `rate_hz` apart."""
    points = rng.uniform(1 - depth, 1, int(n / SAMPLE_RATE * rate_hz) + 2)
    return np.interp(np.linspace(0, points.size - 1, n), np.arange(points.size), points)


def _impacts(rng, times, duration, freq, decay, noise=0.3) -> np.ndarray:
    """Damped-sine impacts (a knock, a thump, a click) at the given times."""
    out = np.zeros(samples(duration))
    hit = _t(decay * 6)
    shape = np.sin(2 * np.pi * freq * hit) * np.exp(-hit / decay)
    shape = shape + noise * rng.standard_normal(hit.size) * np.exp(-hit / (decay / 3))
    for time in times:
        start = samples(time)
        end = min(out.size, start + shape.size)
        out[start:end] += shape[: end - start]
    return out


def sample(rng: np.random.Generator, name: str) -> dict:
    """Random parameters of sound `name` (a label of LABELS)."""
    u = lambda a, b: round(float(rng.uniform(a, b)), 2)  # noqa: E731
    p = {"label": name, "duration": u(1.5, 4.0)}
    if name == "tone":
        p["freq"] = int(rng.integers(20, 201)) * 10  # 200..2000 Hz in 10 Hz steps
    elif name in ("beeps", "clicks", "bell", "knocking", "telephone ringing"):
        p["n"] = int(rng.integers(2, 7 if name != "telephone ringing" else 4))
        p["freq"] = int(rng.integers(60, 200)) * 10
        p["gap"] = u(0.15, 0.4)
    elif name == "chirp":
        p.update(direction=str(rng.choice(["rising", "falling"])), low=int(rng.integers(200, 800)),
                 high=int(rng.integers(1500, 4000)), duration=u(0.5, 2.0))
    elif name == "siren":
        p["style"] = str(rng.choice(["wailing", "two-tone"]))
        p["freq"] = int(rng.integers(55, 85)) * 10
    elif name == "heartbeat":
        p["bpm"] = int(rng.integers(50, 111))
        p["duration"] = u(3.0, 5.0)
    elif name == "engine":
        p["freq"] = int(rng.integers(25, 70))
    elif name == "keypad tones":
        p["digits"] = [int(d) for d in rng.integers(0, 12, int(rng.integers(3, 8)))]
    p["caption"] = str(rng.choice(CAPTIONS[name]))
    return p


def caption(p: dict) -> str:
    n = number_words(p.get("n", 0))
    return p["caption"].format(n=n, N=n.capitalize(), freq=p.get("freq"), bpm=p.get("bpm"),
                               direction=p.get("direction"), style=p.get("style"))


def render(p: dict, rng: np.random.Generator) -> np.ndarray:
    """Parameters from `sample` -> float32 audio at 16 kHz, peak -1 dBFS."""
    name, duration = p["label"], p["duration"]
    n = samples(duration)
    t = _t(duration)
    if name == "tone":
        wav = dsp.fade(np.sin(2 * np.pi * p["freq"] * t), 0.02)
    elif name == "beeps":
        wav = _sequence([_burst(0.15, [p["freq"]])] * p["n"], p["gap"])
    elif name == "clicks":
        clicks = [dsp.fade(rng.standard_normal(samples(0.004)) * np.exp(-_t(0.004) / 0.001), 0.0005)
                  for _ in range(p["n"])]
        wav = _sequence(clicks, p["gap"])
    elif name == "bell":
        partials = [p["freq"] * r for r in (0.5, 1.0, 1.19, 1.5, 2.0, 2.74)]  # a church-bell-like spread
        wav = _sequence([_burst(1.2, partials, decay=0.35)] * p["n"], p["gap"] / 2)
    elif name == "knocking":
        times = 0.1 + np.arange(p["n"]) * (0.18 + p["gap"] / 2)
        wav = _impacts(rng, times, times[-1] + 0.4, 180.0, 0.012, noise=0.6)
    elif name == "telephone ringing":  # a 440+480 Hz ring, trilled at 20 Hz like an electronic ringer
        ring = _burst(1.0, [440, 480]) * (0.6 + 0.4 * np.sign(np.sin(2 * np.pi * 20 * _t(1.0))))
        wav = _sequence([ring] * p["n"], 0.6)
    elif name == "chirp":
        f0, f1 = (p["low"], p["high"]) if p["direction"] == "rising" else (p["high"], p["low"])
        freq = f0 * (f1 / f0) ** (t / duration)  # exponential sweep
        wav = dsp.fade(np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE), 0.02)
    elif name == "siren":
        if p["style"] == "wailing":
            freq = p["freq"] * (1 + 0.45 * np.sin(2 * np.pi * 0.4 * t - np.pi / 2))
        else:
            freq = np.where((t % 1.0) < 0.5, p["freq"], p["freq"] * 1.33)
        phase = 2 * np.pi * np.cumsum(freq) / SAMPLE_RATE
        wav = dsp.fade(np.sin(phase) + 0.3 * np.sin(2 * phase))  # a touch of second harmonic: less pure
    elif name in ("white noise", "pink noise", "brown noise"):
        wav = dsp.fade(dsp.coloured_noise(rng, n, name.split()[0]), 0.05)
    elif name == "rain":
        bed = dsp.coloured_noise(rng, n, "pink") * 0.3
        drops = np.zeros(n)
        for start in rng.integers(0, n - 200, int(duration * 60)):  # about 60 drops a second
            drops[start: start + 200] += rng.standard_normal(200) * np.exp(-np.arange(200) / 25) * rng.uniform(0.2, 1)
        wav = dsp.fade(bed + np.diff(drops, prepend=0.0), 0.1)  # diff: drops are bright, high-passed
    elif name == "wind":
        wav = dsp.fade(dsp.coloured_noise(rng, n, "brown") * _envelope(rng, n, 2.0, 0.9), 0.2)
    elif name == "ocean waves":
        swell = 0.5 - 0.5 * np.cos(2 * np.pi * t / max(duration / 1.5, 1.0))
        wav = dsp.fade(dsp.coloured_noise(rng, n, "pink") * (0.1 + swell), 0.2)
    elif name == "dial tone":
        wav = _burst(duration, [350, 440])
    elif name == "busy signal":
        wav = _burst(duration, [480, 620]) * ((t % 1.0) < 0.5)
    elif name == "alarm":
        square = np.sign(np.sin(2 * np.pi * 2400 * t))
        wav = dsp.fade(square * ((t % 0.25) < 0.125))
    elif name == "heartbeat":
        beat = 60.0 / p["bpm"]
        times = [x for start in np.arange(0.1, duration - 0.5, beat) for x in (start, start + 0.28)]
        wav = _impacts(rng, times, duration, 50.0, 0.04, noise=0.05)
    elif name == "engine":
        harmonics = sum(np.sin(2 * np.pi * p["freq"] * k * t + k) / k for k in range(1, 12))
        wav = dsp.fade(harmonics * (1 + 0.2 * np.sin(2 * np.pi * p["freq"] / 4 * t))
                       + 0.3 * dsp.coloured_noise(rng, n, "brown"), 0.1)
    elif name == "keypad tones":
        tones = [_burst(0.15, [DTMF_LOW[d // 3], DTMF_HIGH[d % 3]]) for d in p["digits"]]
        wav = _sequence(tones, 0.1)
    else:
        raise ValueError(f"unknown sound {name!r}")
    return dsp.normalize_peak(np.asarray(wav, dtype=np.float32))
