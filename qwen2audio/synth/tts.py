"""Text-to-speech through the Debian engines espeak-ng, flite and festival.

A voice is a plain dict (engine, voice name, speaking rate/pitch, gender when the engine states
it) chosen by the plan, so rendering is a pure function of that dict and the text. More engines
and voices mean the model cannot learn one synthesizer's timbre instead of the words.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np

from . import dsp
from .errors import SynthError, require_program

# Source name (for --sources) -> (program, Debian package(s) that provide it and its voices).
ENGINES = {
    "espeak": ("espeak-ng", "espeak-ng"),
    "flite": ("flite", "flite"),
    "festival": ("text2wave", "festival festvox-us-slt-hts festvox-kallpc16k"),
}

# espeak-ng language voices per language code of the corpus (accents count as variety).
ESPEAK_LANGUAGES = {
    "en": ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-029", "en-us-nyc"],
    "de": ["de"],
    "es": ["es", "es-419"],
    "fr": ["fr-fr", "fr-be", "fr-ch"],
    "it": ["it"],
    "ru": ["ru"],
    "zh": ["cmn"],
}
# espeak-ng voice variants with the gender their files declare; unmarked ones are left as None
# rather than guessed. Novelty variants (robots, "Demonic") are left out: they are hard to understand.
ESPEAK_VARIANTS = {
    **{f"f{i}": "female" for i in range(1, 6)},
    **{f"m{i}": "male" for i in range(1, 9)},
    **dict.fromkeys(["Alicia", "Andrea", "Annie", "anika", "aunty", "belinda", "grandma", "linda",
                     "steph", "steph2", "whisperf"], "female"),
    **dict.fromkeys(["Andy", "Denis", "Diogo", "Henrique", "Hugo", "Lee", "Marco", "antonio", "michel",
                     "miguel", "sandro", "travis", "victor", "whisper"], "male"),
    **dict.fromkeys(["adam", "benjamin", "caleb", "david", "edward", "john", "max", "paul", "pablo",
                     "quincy", "rob", "klatt", "klatt3"], None),
}
FLITE_VOICES = {"kal": "male", "kal16": "male", "awb": "male", "rms": "male", "slt": "female"}
FESTIVAL_VOICES = {"voice_cmu_us_slt_arctic_hts": "female", "voice_kal_diphone": "male"}

# How often each engine is picked for English when all are available: espeak-ng has by far the
# most voices; festival is the slowest (about 0.3 s a call).
ENGINE_WEIGHTS = {"espeak": 0.5, "flite": 0.3, "festival": 0.2}


def engine_languages(engine: str) -> set[str]:
    return set(ESPEAK_LANGUAGES) if engine == "espeak" else {"en"}


def check_engines(engines) -> None:
    for engine in engines:
        program, package = ENGINES[engine]
        require_program(program, package, engine)


def choose_voice(rng: np.random.Generator, language: str, engines: list[str]) -> dict:
    """A random voice that speaks `language`, from the given engines."""
    usable = [e for e in engines if language in engine_languages(e)]
    if not usable:
        raise SynthError(f"no selected speech engine speaks language {language!r} (espeak-ng speaks all)")
    weights = np.array([ENGINE_WEIGHTS[e] for e in usable])
    engine = usable[int(rng.choice(len(usable), p=weights / weights.sum()))]
    if engine == "espeak":
        variant = str(rng.choice(sorted(ESPEAK_VARIANTS, key=str)))
        return {"engine": engine, "voice": str(rng.choice(ESPEAK_LANGUAGES[language])), "variant": variant,
                "gender": ESPEAK_VARIANTS[variant], "rate": int(rng.integers(125, 206)),
                "pitch": int(rng.integers(25, 76))}
    table = FLITE_VOICES if engine == "flite" else FESTIVAL_VOICES
    voice = str(rng.choice(sorted(table)))
    # Duration stretch > 1 is slower speech; flite also takes a mean pitch in Hz.
    out = {"engine": engine, "voice": voice, "gender": table[voice],
           "stretch": round(float(rng.uniform(0.85, 1.25)), 3)}
    if engine == "flite":
        out["f0"] = int(rng.integers(90, 130) if table[voice] == "male" else rng.integers(150, 210))
    return out


def voice_name(voice: dict) -> str:
    """A short stable name of a voice for manifests: 'espeak-ng:en-us+f3', 'flite:slt'."""
    program = ENGINES[voice["engine"]][0]
    program = "festival" if program == "text2wave" else program
    suffix = f"+{voice['variant']}" if voice.get("variant") else ""
    return f"{program}:{voice['voice']}{suffix}"


# A TTS call takes a second or two; a timeout means the machine was starved or the build paused (SIGSTOP
# keeps the wall clock running), so one longer retry is tried before the item, and the build, fails.
TIMEOUTS_S = (120, 600)


def _run(command: list[str], text: str | None, what: str) -> None:
    for timeout in TIMEOUTS_S:
        try:
            subprocess.run(command, input=text, capture_output=True, text=True, check=True, timeout=timeout)
            return
        except subprocess.CalledProcessError as e:
            raise SynthError(f"{what} failed (exit {e.returncode}): {' '.join(e.stderr.split())[:200]}") from None
        except subprocess.TimeoutExpired:
            continue
    raise SynthError(f"{what} did not finish in {' s, then '.join(map(str, TIMEOUTS_S))} s")


def speak(text: str, voice: dict) -> np.ndarray:
    """Synthesize `text` with `voice` -> float32 at 16 kHz, silence trimmed, peak at -1 dBFS."""
    with tempfile.TemporaryDirectory(prefix="q2a-tts-") as tmp:
        out = Path(tmp) / "out.wav"
        engine = voice["engine"]
        if engine == "espeak":
            # Text on stdin: never parsed as an option, any script passes unharmed.
            _run(["espeak-ng", "-v", f"{voice['voice']}+{voice['variant']}", "-s", str(voice["rate"]),
                  "-p", str(voice["pitch"]), "-w", str(out)], text, "espeak-ng")
        elif engine == "flite":
            _run(["flite", "-voice", voice["voice"], "--setf", f"duration_stretch={voice['stretch']}",
                  "--setf", f"int_f0_target_mean={voice['f0']}", "-t", text, "-o", str(out)], None, "flite")
        elif engine == "festival":
            _run(["text2wave", "-eval", f"({voice['voice']})",
                  "-eval", f"(Parameter.set 'Duration_Stretch {voice['stretch']})", "-o", str(out)],
                 text, "festival text2wave")
        else:
            raise SynthError(f"unknown speech engine {engine!r}")
        wav = dsp.read_wav(out)
    wav = dsp.trim_silence(wav)
    if dsp.rms(wav) == 0.0:
        raise SynthError(f"{voice_name(voice)} produced silence for {text!r}")
    return dsp.normalize_peak(wav)
