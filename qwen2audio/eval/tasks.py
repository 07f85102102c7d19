"""The evaluation tasks: which reader, which prompt format, which official scorer."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from ..errors import Qwen2AudioError
from . import choice, data, metrics


@dataclass(frozen=True)
class Task:
    name: str
    read: Callable  # (data_path, audio_root) -> list[Item]
    mode: str  # "raw": base-model prompt with the audio block; "chat": user turn = [audio, text]
    metric: str  # what the headline number is, for reports
    description: str
    # Fields that receive the answer; MMAU's own scorer reads it from "model_prediction".
    answer_fields: tuple[str, ...] = ("response",)


def _by_source(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["source"]].append(r)
    return dict(sorted(groups.items()))


def score_asr(records: list[dict], language: str | None = None, **_) -> dict:
    out = {}
    for source, rs in _by_source(records).items():
        langs = [metrics.asr_language(source, r.get("prompt", ""), language) for r in rs]
        wer = metrics.corpus_wer([r["gt"] for r in rs], [r["response"] for r in rs], langs)
        unit = "CER" if all(lang in metrics.CHARACTER_LANGUAGES for lang in langs) else "WER"
        out[source] = {"n": len(rs), "language": "/".join(sorted(set(langs))), "unit": unit, **wer}
    return {"sources": out}


def score_s2tt(records: list[dict], language: str | None = None, **_) -> dict:
    out = {}
    for source, rs in _by_source(records).items():
        tok = metrics.bleu_tokenizer(source, language)
        bleu = metrics.corpus_bleu([r["response"] for r in rs], [r["gt"] for r in rs], tok)
        out[source] = {"n": len(rs), "tokenize": tok, "bleu": bleu}
    return {"sources": out}


def score_labels(records: list[dict], **_) -> dict:
    return {"sources": {source: {"n": len(rs), **metrics.label_accuracy([r["gt"] for r in rs],
                                                                         [r["response"] for r in rs])}
                        for source, rs in _by_source(records).items()}}


def score_qa(records: list[dict], **_) -> dict:
    """Accuracy per source: exact answers (label_accuracy without its confusion table: answers are free text),
    or, for items marked `"match": "key"`, answers that contain one of the item's key words."""
    out = {}
    for source, rs in _by_source(records).items():
        score = metrics.key_accuracy if any(r.get("match") == "key" for r in rs) else metrics.label_accuracy
        m = score([r["gt"] for r in rs], [r["response"] for r in rs])
        out[source] = {"n": len(rs), **{k: v for k, v in m.items() if k != "confusion"}}
    return {"sources": out}


def score_foundation(records: list[dict], **_) -> dict:
    return choice.foundation_scores(records)


def score_mmau(records: list[dict], **_) -> dict:
    return choice.mmau_scores(records)


TASKS = {
    "asr": Task("asr", data.read_qwen_jsonl, "raw", "WER",
                "speech recognition, Qwen2-Audio eval JSONL (LibriSpeech, Common Voice, Fleurs, Aishell2)"),
    "s2tt": Task("s2tt", data.read_qwen_jsonl, "raw", "BLEU", "speech translation, Qwen2-Audio eval JSONL (CoVoST2)"),
    "ser": Task("ser", data.read_qwen_jsonl, "raw", "accuracy", "speech emotion recognition (Meld)"),
    "vsc": Task("vsc", data.read_qwen_jsonl, "raw", "accuracy", "vocal sound classification (VocalSound)"),
    "audio-qa": Task("audio-qa", data.read_qa_jsonl, "chat", "accuracy",
                     "questions about audio or voice chat (empty question): {audio, question, gt, source}, exact answer "
                     "(or key words: \"match\": \"key\", gt a list of keys)"),
    "airbench-foundation": Task("airbench-foundation", lambda p, r: data.read_airbench(p, "Foundation", r), "chat",
                                "accuracy", "AIR-Bench foundation: single-choice questions"),
    "airbench-chat": Task("airbench-chat", lambda p, r: data.read_airbench(p, "Chat", r), "chat", "judge score",
                          "AIR-Bench chat: open questions scored by an LLM judge"),
    "mmau": Task("mmau", data.read_mmau, "chat", "accuracy", "MMAU test-mini / test multiple choice",
                 ("response", "model_prediction")),
}

SCORERS = {"asr": score_asr, "s2tt": score_s2tt, "ser": score_labels, "vsc": score_labels, "audio-qa": score_qa,
           "airbench-foundation": score_foundation, "mmau": score_mmau}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise Qwen2AudioError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]
