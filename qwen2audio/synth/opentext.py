"""Open-vocabulary sentences to speak, cut from the quotations of Debian's fortune packages.

The template sentences of `sentences.py` cover a few hundred words; a model that only ever hears them
invents a template sentence for anything else. Fortunes hold tens of thousands of sentences written
by people, on every subject, in English, German, Spanish, Italian and Russian. Each quotation is cut
into sentences; only those a TTS engine reads exactly as written are kept (letters and plain
punctuation: a digit, an abbreviation or a URL would be spoken as words the transcript lacks).
"""

from __future__ import annotations

import functools
import re
import subprocess
import unicodedata
from pathlib import Path

from .errors import SynthError
from .split import is_heldout

# Language -> the Debian packages whose fortune files are in that language.
PACKAGES = {"en": ("fortunes", "fortunes-min"), "de": ("fortunes-de",), "es": ("fortunes-es",),
            "it": ("fortunes-it",), "ru": ("fortunes-ru",)}
MIN_WORDS, MAX_WORDS = 4, 18
_LETTERS = {"en": "a-zA-Z", "de": "a-zA-ZäöüÄÖÜß", "es": "a-zA-ZáéíóúñüÁÉÍÓÚÑÜ",
            "it": "a-zA-ZàèéìíòóùÀÈÉÌÒÙ", "ru": "а-яА-ЯёЁ"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _fortune_files(package: str) -> list[Path]:
    try:
        listed = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        raise SynthError(f"open-vocabulary text needs the Debian package {package} (apt-get install {package})") \
            from None
    files = []
    for line in listed.splitlines():
        path = Path(line)
        if "/fortunes" in line and path.suffix not in (".dat", ".u8") and path.is_file() and not path.is_symlink():
            files.append(path)
    return sorted(files)


def _quotations(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text.split("\n%\n")


def _clean(quotation: str) -> str:
    lines = []
    for line in quotation.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith(("--", "—", "-- ")) or re.match(r"^[A-Z][a-z]*:", stripped):
            continue  # attributions and dialogue speaker tags
        lines.append(stripped)
    return unicodedata.normalize("NFC", " ".join(lines))


def _speakable(sentence: str, language: str) -> bool:
    letters = _LETTERS[language]
    if not re.fullmatch(rf"[{letters}][{letters}' ,;:!?.\-]*[.!?]", sentence):
        return False
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    # Shouting, initials and abbreviations are read letter by letter or not at all.
    return not any(len(w.strip(".,;:!?'")) > 1 and w.strip(".,;:!?'").isupper() for w in words) and \
        not re.search(r"\b\w\.", sentence[:-1]) and "--" not in sentence and " -" not in sentence


@functools.lru_cache(maxsize=None)
def sentences(language: str) -> tuple[str, ...]:
    """Every distinct speakable sentence of `language`, in a fixed order."""
    if language not in PACKAGES:
        raise SynthError(f"no open-vocabulary text for language {language!r}; have {', '.join(PACKAGES)}")
    found: dict[str, None] = {}
    for package in PACKAGES[language]:
        for path in _fortune_files(package):
            for quotation in _quotations(path):
                for sentence in _SENTENCE_END.split(_clean(quotation)):
                    sentence = re.sub(r"\s+", " ", sentence).strip().strip('"')
                    if _speakable(sentence, language):
                        found.setdefault(sentence, None)
    if not found:
        raise SynthError(f"no speakable {language} sentences found in {', '.join(PACKAGES[language])}")
    return tuple(found)


@functools.lru_cache(maxsize=None)
def split_sentences(language: str, heldout: bool) -> tuple[str, ...]:
    return tuple(s for s in sentences(language) if is_heldout(s) == heldout)


def sentence(rng, language: str, heldout: bool) -> str:
    pool = split_sentences(language, heldout)
    return pool[int(rng.integers(len(pool)))]
