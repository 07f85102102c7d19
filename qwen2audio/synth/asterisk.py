"""Real human recordings with transcripts: Debian's asterisk-core-sounds-{en,es,fr,it,ru}.

One professional voice per language, telephone prompts of 0.5-25 s. Transcripts are lines
`name: text` in /usr/share/doc/asterisk-core-sounds-LANG/core-sounds-LANG.txt.gz; audio is
G.722 (16 kHz, preferred) or 8 kHz PCM wav under /usr/share/asterisk/sounds/<voice>/.
"""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import numpy as np

from . import dsp
from .errors import MissingToolError, SynthError

SOUNDS_DIR = Path("/usr/share/asterisk/sounds")
DOC_DIR = Path("/usr/share/doc")
G722_BYTES_PER_SECOND = 8000  # G.722 is 64 kbit/s whatever the audio

# language -> voice folder, speaker gender, licence, credit (from the packages' copyright files)
VOICES = {
    "en": ("en_US_f_Allison", "female", "CC-BY-SA-3.0", "Recorded by Allison Smith (theivrvoice.com)"),
    "es": ("es_MX_f_Allison", "female", "CC-BY-SA-3.0", "Recorded by Allison Smith (theivrvoice.com)"),
    "fr": ("fr_CA_f_June", "female", "CC-BY-SA-3.0",
           "Recorded by June Wallack; translated by Clod Patry, Kristopher Lalletti and June Wallack"),
    "it": ("it_IT_m_Carlo", "male", "CC-BY-3.0", "Recorded by Carlo Flora; translated by Silvia Petrin"),
    "ru": ("ru_RU_f_IvrvoiceRU", "female", "CC-BY-3.0", "Provided by Maxim Topal (ivrvoice.ru)"),
}
LICENCE_URLS = {"CC-BY-SA-3.0": "https://creativecommons.org/licenses/by-sa/3.0/",
                "CC-BY-3.0": "https://creativecommons.org/licenses/by/3.0/"}
# Descriptions of non-speech content, never spoken: "[this is a simple beep tone]", "<beep ascending>",
# and a trailing "[@]" after a spoken symbol name ("at [@]").
_BRACKETS = re.compile(r"\[[^\]]*\]|<[^>]*>")


def transcript_file(language: str) -> Path:
    return DOC_DIR / f"asterisk-core-sounds-{language}" / f"core-sounds-{language}.txt.gz"


def clean_transcript(text: str) -> str | None:
    """The spoken words of one transcript, or None when the line does not give them reliably.

    Bracketed descriptions are dropped. A line with parentheses is skipped whole: they mix
    descriptions ("(10 seconds of silence)", "(emphase)") with spoken asides, and a wrong
    transcript is worse than a missing one.
    """
    if "(" in text or ")" in text:
        return None
    text = " ".join(_BRACKETS.sub(" ", text).split())
    text = re.sub(r"\s+([,.!?;:])", r"\1", text)  # "word ." left by a dropped bracket
    return text if any(ch.isalpha() for ch in text) else None


def parse_transcripts(text: str) -> dict[str, str]:
    """`name: text` lines -> {name: cleaned text}; comments (;), blank lines and lines without
    usable speech (see clean_transcript) are left out."""
    out = {}
    for line in text.lstrip("\ufeff").splitlines():
        line = line.strip()
        if not line or line.startswith(";") or ":" not in line:
            continue
        name, _, spoken = line.partition(":")
        cleaned = clean_transcript(spoken)
        if name.strip() and cleaned:
            out[name.strip()] = cleaned
    return out


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _package_hint(language: str) -> str:
    return f"asterisk-core-sounds-{language} asterisk-core-sounds-{language}-g722"


def check_languages(languages) -> None:
    for language in languages:
        if language not in VOICES:
            raise SynthError(f"no asterisk recordings for language {language!r}; have {', '.join(VOICES)}")
        voice_dir = SOUNDS_DIR / VOICES[language][0]
        if not transcript_file(language).is_file() or not voice_dir.is_dir():
            raise MissingToolError(
                f"source 'asterisk' needs the {language} recordings: install them with "
                f"'apt-get install {_package_hint(language)}', or leave 'asterisk' out of --sources")


def _audio_file(voice_dir: Path, name: str) -> Path | None:
    for suffix in (".g722", ".wav"):
        path = voice_dir / f"{name}{suffix}"
        if path.is_file():
            return path
    return None


def _duration(path: Path) -> float:
    if path.suffix == ".g722":
        return path.stat().st_size / G722_BYTES_PER_SECOND
    import soundfile as sf

    return sf.info(str(path)).duration


def clips(language: str, max_seconds: float = 30.0) -> list[dict]:
    """Every usable clip of one language, sorted by name: {name, path, text, duration, split_key}.
    Clips longer than `max_seconds` (the model's 30 s window) are left out."""
    check_languages([language])
    with gzip.open(transcript_file(language), "rt", encoding="utf-8") as f:
        transcripts = parse_transcripts(f.read())
    voice_dir = SOUNDS_DIR / VOICES[language][0]
    out = []
    for name in sorted(transcripts):
        path = _audio_file(voice_dir, name)
        if path is None:
            continue
        duration = _duration(path)
        if 0.3 <= duration <= max_seconds:
            out.append({"name": name, "path": str(path), "text": transcripts[name], "duration": round(duration, 3)})
    # The split key is the file name, except that clips with the same words (the prompts repeat
    # some sentences under several names) share the first such name's key, so that no held-out
    # transcript is also a training transcript.
    first_name = {}
    for clip in out:
        first_name.setdefault(_normal(clip["text"]), clip["name"])
    for clip in out:
        clip["split_key"] = first_name[_normal(clip["text"])]
    if not out:
        raise MissingToolError(f"no {language} asterisk audio found under {voice_dir}: install "
                               f"'asterisk-core-sounds-{language}-g722' (or -wav)")
    return out


def load(path: str) -> np.ndarray:
    """One recording -> float32 at 16 kHz, peak at -1 dBFS."""
    if path.endswith(".g722"):
        import av  # raw G.722 has no container header: name the format

        with av.open(path, format="g722") as container:
            frames = [f.to_ndarray() for f in container.decode(audio=0)]
            rate = container.streams.audio[0].rate
        wav = dsp.resample(np.concatenate(frames, axis=1).mean(axis=0).astype(np.float32) / 32768.0, rate)
    else:
        wav = dsp.read_wav(path)
    return dsp.normalize_peak(dsp.trim_silence(wav))


def write_attribution(directory: Path, languages) -> list[str]:
    """Copy each package's copyright file (it holds the full licence text) into the corpus and
    return the attribution lines for the corpus README."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for language in sorted(languages):
        folder, _, licence, credit = VOICES[language]
        source = DOC_DIR / f"asterisk-core-sounds-{language}" / "copyright"
        if source.is_file():
            shutil.copyfile(source, directory / f"asterisk-core-sounds-{language}.copyright")
        lines.append(f"- `audio/asterisk/{language}/`: Asterisk core sound prompts ({language}, voice {folder}). "
                     f"{credit}. Licence {licence} ({LICENCE_URLS[licence]}); Debian package "
                     f"asterisk-core-sounds-{language}. Changed: converted to 16 kHz mono WAV, silence trimmed, "
                     f"level normalised, some with added noise or reverberation. Full licence text: "
                     f"ATTRIBUTION/asterisk-core-sounds-{language}.copyright.")
    return lines
