"""Scores of Qwen2-Audio's official evaluation scripts: corpus WER/CER, sacrebleu BLEU, label accuracy.

Every step mirrors ``evaluate_asr.py`` / ``evaluate_st.py`` / ``evaluate_emotion.py`` of the
Qwen2-Audio repository, including the order of the normalisers; where their behaviour is odd
(English text goes through Whisper's English normaliser *and then* the basic one) it is kept,
because the point is to reproduce the published numbers.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from functools import lru_cache

from ..errors import Qwen2AudioError
from .cn_tn import normalize_chinese

PUNCS = "!,.?;:"  # a space before these is removed before scoring
TAG_RE = re.compile(r"<\|.*?\|>")
CHARACTER_LANGUAGES = ("zh", "yue")  # scored per character (CER)
EXACT_WHISPER_NORMALIZER = "whisper-normalizer==0.1.1"


class MetricError(Qwen2AudioError):
    """A metric cannot be computed (a missing optional dependency, an unusable language)."""


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MetricError(f"scoring needs the package {package!r}: pip install {package}") from None


@lru_cache(maxsize=None)
def _normalizers():
    english = _need("whisper_normalizer.english", EXACT_WHISPER_NORMALIZER).EnglishTextNormalizer()
    basic = _need("whisper_normalizer.basic", EXACT_WHISPER_NORMALIZER).BasicTextNormalizer()
    # whisper-normalizer >= 0.1.2 added contractions of its own ("kinda" -> "kind of", "cause" ->
    # "because") that Whisper's normaliser, and so the official scores, do not have.
    if english("kinda cause") != "kinda cause":
        raise MetricError("the installed whisper-normalizer differs from Whisper's own English normaliser "
                          f"('kinda cause' -> {english('kinda cause')!r}); install {EXACT_WHISPER_NORMALIZER}")
    return english, basic


# ---- ASR ---------------------------------------------------------------------------------------
def remove_special(text: str, language: str) -> str:
    """Drop <|...|> tags and tidy spaces, as the official ``remove_sp`` does before normalising."""
    text = TAG_RE.sub(" ", text)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(f" ?([{PUNCS}])", r"\1", text)
    text = text.lstrip(" ")
    if language == "zh":
        text = re.sub(r"\s+", "", text)
    return text


def _remove_punctuation_tokens(text: str) -> str:
    # fairseq's EvaluationTokenizer: drop space-separated tokens made only of punctuation.
    return " ".join(t for t in text.split(" ") if not all(unicodedata.category(c)[0] == "P" for c in t))


def asr_tokens(text: str, language: str) -> list[str]:
    """Text -> the units the official scorer compares: words, or characters for zh / yue."""
    english, basic = _normalizers()
    text = remove_special(text, language)
    if language == "yue":
        text = _need("zhconv", "zhconv").convert(text, "zh-cn")
    if language == "en":
        text = english(text)
    text = normalize_chinese(text) if language == "zh" else basic(text)
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokens = _remove_punctuation_tokens(Tokenizer13a()(text)).lower().split()
    if language in CHARACTER_LANGUAGES:
        tokens = list("".join(tokens))
    return tokens


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    return _need("editdistance", "editdistance").eval(ref, hyp)


def corpus_wer(refs: list[str], hyps: list[str], languages: list[str]) -> dict:
    """Total edit distance / total reference units (a corpus rate, not a mean of sentence rates)."""
    errors = length = 0
    for ref, hyp, lang in zip(refs, hyps, languages):
        r, h = asr_tokens(ref, lang), asr_tokens(hyp, lang)
        errors += edit_distance(r, h)
        length += len(r)
    return {"errors": errors, "ref_units": length, "wer": errors / length if length else None}


def asr_language(source: str, prompt: str = "", override: str | None = None) -> str:
    """The language that picks the normaliser: --language, else the prompt's target tag, else the source name.

    The official script takes it from a per-dataset table (librispeech en, aishell2 zh, cv15_yue yue,
    ...); the eval JSONL prompts end with that language's tag (``... speech: <|en|>``).
    """
    if override:
        return override
    tags = re.findall(r"<\|([a-z]{2,3})\|>", prompt)
    if tags:
        return tags[-1]
    words = set(re.split(r"[^a-z0-9]+", source.lower()))
    if words & {"librispeech", "tedlium", "gigaspeech"}:
        return "en"
    if words & {"aishell", "aishell1", "aishell2", "wenetspeech"}:
        return "zh"
    for lang in ("yue", "zh", "en", "fr", "de", "es", "it", "ja", "ko", "ru"):
        if lang in words:
            return lang
    return "unknown"  # scored like 'other languages': basic normaliser, per word


# ---- S2TT --------------------------------------------------------------------------------------
def bleu_tokenizer(source: str, target_language: str | None = None) -> str:
    """sacrebleu tokenizer: the official script reads the target from the source name ('covost2_en_zh_test')."""
    parts = source.split("_")
    lang = target_language or (parts[-2] if len(parts) >= 2 else "")
    return {"ja": "ja-mecab", "zh": "zh"}.get(lang, "13a")


def corpus_bleu(hyps: list[str], refs: list[str], tokenize: str) -> float:
    sacrebleu = _need("sacrebleu", "sacrebleu")
    try:
        return sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score
    except RuntimeError as e:
        if tokenize == "ja-mecab":
            raise MetricError("BLEU for Japanese targets uses sacrebleu's ja-mecab tokenizer, which needs MeCab: "
                              "pip install 'sacrebleu[ja]'") from None
        raise MetricError(f"sacrebleu failed: {e}") from None


# ---- SER / VSC ---------------------------------------------------------------------------------
def _words(text: str) -> str:
    return " " + " ".join(re.sub(r"[^\w\s]", " ", text.casefold().replace("-", " ")).split()) + " "


def key_accuracy(keys: list[str | list[str]], hyps: list[str]) -> dict:
    """A free-form answer is right when it contains one of its keys as whole words (case, punctuation and
    hyphens ignored): "Seven plus nine is sixteen." and "16" both answer a question keyed ["16", "sixteen"]."""
    correct = 0
    for key, hyp in zip(keys, hyps):
        options = [key] if isinstance(key, str) else list(key)
        correct += any(_words(k) in _words(hyp) for k in options)
    return {"correct": correct, "total": len(keys), "accuracy": correct / len(keys) if keys else None}


def label_accuracy(refs: list[str], hyps: list[str]) -> dict:
    """Exact match after removing leading whitespace from the answer; confusion counts per reference label.

    Answers that are not one of the reference labels are counted under '<other>' in the confusion
    table, so that free-form text does not blow it up.
    """
    labels = set(refs)
    confusion: dict[str, Counter] = defaultdict(Counter)
    correct = 0
    for ref, hyp in zip(refs, hyps):
        hyp = hyp.lstrip()
        correct += hyp == ref
        confusion[ref][hyp if hyp in labels else "<other>"] += 1
    return {"correct": correct, "total": len(refs), "accuracy": correct / len(refs) if refs else None,
            "confusion": {ref: dict(sorted(c.items())) for ref, c in sorted(confusion.items())}}
