"""The default model's report: its figures on the training corpus's held-out clips, beside natural baselines.

    python -m qwen2audio.bundle.evaluate [--model DIR] [--corpus DIR] [--limit N] [--baselines] [--json OUT] [--card]
    qwen2audio report ...                (the same command)

Every clip comes from the held-out split of the corpus `qwen2audio synth` built for training (no sentence, question
or recording in it was trained on), or, for the open questions, from `openqa.py` (questions written for this and
spoken here, never trained on). Sections:

1. asr_real     ASR of the real Asterisk recordings (en, es, fr, it, ru): WER per language, pooled over the five
2. asr_open     ASR of open-vocabulary English sentences (Debian fortunes) spoken by TTS voices: WER
3. sound, instrument   the label of generated sound events / fluidsynth instruments, with the corpus's own prompts
4. voice_chat   a spoken question alone, answered: right when the answer holds one of the question's key words,
                over the corpus's held-out spoken questions (keys from their content) and the open questions

The model runs through the public API (`qwen2audio.load()`, batched); ASR and labels take the base model's raw task
prompts, as the corpus trains them (the paper's protocol), voice chat the chat template. Scores are the project's
evaluator's (`eval.tasks`: corpus WER with the official normalisers, exact label match, key match).

Baselines, measured on the same clips: chance and the majority label on the classification sections (always: they
cost nothing); with --baselines, Whisper base alone (`whisper_asr.py`, the encoder the model starts from, with
Whisper's own decoder) on the ASR sections, and on voice chat the same model given the question typed ("typed": no
audio, its language model's own ceiling) and the cascade Whisper base transcript -> the same model typed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import Qwen2AudioError

if TYPE_CHECKING:
    import numpy as np

CARD_START, CARD_END = "<!-- evaluation:start -->", "<!-- evaluation:end -->"
ASTERISK_LANGUAGES = {"en": "English", "es": "Spanish", "fr": "French", "it": "Italian", "ru": "Russian"}
MAX_NEW_TOKENS = 96  # ASR: every held-out transcript is far shorter; a hallucination loop stops here (both systems)
LABEL_MAX_NEW_TOKENS = 16
CHAT_MAX_NEW_TOKENS = 64  # a right answer names its key early; what answers.py's targets are cut to as well
SECTIONS = ("asr_real", "asr_open", "sound", "instrument", "voice_chat")
SYSTEM_NAMES = {"model": "this model", "whisper": "Whisper base", "typed": "typed", "cascade": "Whisper base -> typed",
                "chance": "chance", "majority": "majority label"}


class EvaluateError(Qwen2AudioError):
    """The corpus, the model or the options cannot give a report."""


def default_corpus() -> Path:
    """Where the default model's training recipe builds its corpus (train_default.py: WORK/corpus1)."""
    return Path.home() / "work" / "corpus1"


# ---- keys of the corpus's spoken questions --------------------------------------------------------
CAPITAL_ALIASES = {"Brasilia": ["Brasília"], "Kyiv": ["Kiev"], "Bern": ["Berne"]}
FACT_KEYS = {  # synth.questions.FACTS: the word a right answer names (numbers: digits or words)
    "How many days are there in a week?": 7, "How many months are there in a year?": 12,
    "How many hours are there in a day?": 24, "How many minutes are there in an hour?": 60,
    "How many legs does a spider have?": 8, "How many legs does a dog have?": 4,
    "What colour is the sky on a clear day?": ["blue"], "What colour is fresh grass?": ["green"],
    "At what temperature does water freeze?": 0, "At what temperature does water boil?": 100,
    "What is the largest planet in our solar system?": ["jupiter"], "Which planet is called the red planet?": ["mars"],
    "What do bees make?": ["honey"], "What is the largest ocean on Earth?": ["pacific"],
    "How many continents are there?": 7, "How many sides does a triangle have?": 3,
    "How many sides does a square have?": 4, "What is frozen water called?": ["ice"],
    "What is the tallest mountain in the world?": ["everest"], "Which language is spoken in Brazil?": ["portuguese"],
    "What is the closest star to the Earth?": ["sun"], "What do cows drink?": ["water"],
}


def _number_keys(n: int) -> list[str]:
    from ..synth.sentences import number_words

    return [str(n), number_words(n)] if 0 <= n < 1000 else [str(n)]


def question_keys(q: dict) -> list[str] | None:
    """The key words of a right answer to a `synth.questions` question (any one of them, as whole words:
    `metrics.key_accuracy`), or None for a question without one right answer (greetings)."""
    from ..synth import questions

    kind, content = q["kind"], q["key"].split(":", 1)[1]
    if kind == "arithmetic":
        return _number_keys(int(q["result"]))
    if kind == "capital":
        city = questions.CAPITALS[content]
        return [city, *CAPITAL_ALIASES.get(city, [])]
    if kind == "fact":
        keys = FACT_KEYS.get(q["question"])
        return _number_keys(keys) if isinstance(keys, int) else keys
    if kind == "count":
        start, end = (int(x) for x in content.split("-"))
        numbers = range(start, end + 1)
        return [" ".join(str(i) for i in numbers), " ".join(_number_keys(i)[1] for i in numbers)]
    if kind == "spell":
        return [" ".join(content.upper())]  # "C-A-T", "C A T" and "c, a, t" are all the words "c a t"
    if kind == "sequence":
        return [q["answer"].split()[0]]
    if kind == "opposite":
        return [questions.OPPOSITES[content]]
    if kind == "repeat":
        return [content]
    return None


# ---- the clips of each section ---------------------------------------------------------------------
@dataclass
class Clip:
    audio: str  # path
    source: str  # the scorer's group (asterisk_en, synth_sounds, corpus_arithmetic, ...)
    gt: object  # transcript, label, or key words
    prompt: str = ""  # raw task prompt (ASR, labels)
    language: str = "en"
    text: str = ""  # what is spoken (voice chat: the question typed by the typed baseline)
    extra: dict = field(default_factory=dict)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def spread(rows: list, n: int | None) -> list:
    """At most n rows, evenly spread over the list (a set's order groups similar clips: digits, letters, ...)."""
    if n is None or len(rows) <= n:
        return list(rows)
    return [rows[i * len(rows) // n] for i in range(n)]


def limit_per_source(clips: list[Clip], n: int | None) -> list[Clip]:
    """At most n clips of each source, evenly spread over it (in the set's order)."""
    keep = set()
    for source in dict.fromkeys(c.source for c in clips):
        keep.update(id(c) for c in spread([c for c in clips if c.source == source], n))
    return [c for c in clips if id(c) in keep]


def limit_balanced(clips: list[Clip], n: int | None) -> list[Clip]:
    """At most n clips in all, taken from the sources in turn (the first of each, then the second, ...), so that
    every kind of question is asked as often as the others where it can be."""
    if n is None or len(clips) <= n:
        return list(clips)
    queues = [[c for c in clips if c.source == s] for s in dict.fromkeys(c.source for c in clips)]
    keep: set[int] = set()
    for i in range(max(len(q) for q in queues)):
        for q in queues:
            if i < len(q) and len(keep) < n:
                keep.add(id(q[i]))
    return [c for c in clips if id(c) in keep]


def check_corpus(corpus: Path) -> bool:
    """Whether the corpus is complete (manifest.json); EvaluateError when it holds no evaluation sets at all."""
    if not corpus.is_dir():
        raise EvaluateError(f"no corpus at {corpus}: build it with `qwen2audio synth --output {corpus} ...` "
                            "(the default model's: python -m qwen2audio.bundle.train_default corpus), or pass --corpus DIR")
    missing = [name for name in ("items.jsonl", "eval_asr_real.jsonl") if not (corpus / name).is_file()]
    if missing:
        raise EvaluateError(f"{corpus} holds no {missing[0]}: not a corpus of `qwen2audio synth`, or its build has "
                            "not written its files yet (they come at the end of the build)")
    return (corpus / "manifest.json").is_file()


def _qwen_jsonl(path: Path) -> list[Clip]:
    from ..eval.data import read_qwen_jsonl

    if not path.is_file():
        return []
    return [Clip(it.audio, it.fields["source"], it.fields["gt"], it.text, it.fields["source"].rsplit("_", 1)[-1])
            for it in read_qwen_jsonl(path)]


def corpus_question_clips(corpus: Path) -> tuple[list[Clip], Counter]:
    """Every held-out spoken question of the corpus with key words (and how many of each kind have none)."""
    clips, without = [], Counter()
    for it in _read_jsonl(corpus / "items.jsonl"):
        if it["split"] != "heldout" or it["kind"] != "chat":
            continue
        q = it["question"]
        keys = question_keys(q)
        if not keys:
            without[q["kind"]] += 1
            continue
        clips.append(Clip(str(corpus / it["audio"]), f"corpus_{q['kind']}", keys, text=q["question"]))
    return clips, without


def open_question_clips(work: Path, limit: int | None) -> list[Clip]:
    """The open questions of openqa.py, spoken into WORK (only those the limit keeps, the categories in turn;
    kept between runs)."""
    from . import openqa

    rows = [Clip(str(i), r["category"], None) for i, r in enumerate(openqa.all_questions())]
    path = openqa.write_eval_set(work, indices={int(c.audio) for c in limit_balanced(rows, limit)})
    return [Clip(str(work / r["audio"]), f"open_{r['source'].removeprefix('spoken_')}", r["gt"], text=r["text"])
            for r in _read_jsonl(path)]


def section_clips(corpus: Path, work: Path, limit: int | None, sections=SECTIONS) -> tuple[dict, dict]:
    """section -> clips (at most `limit` per source), and notes on what was left out."""
    out, notes = {}, {}
    if "asr_real" in sections:
        out["asr_real"] = [c for c in _qwen_jsonl(corpus / "eval_asr_real.jsonl") if c.language in ASTERISK_LANGUAGES]
    if "asr_open" in sections:
        out["asr_open"] = [c for c in _qwen_jsonl(corpus / "eval_asr_open.jsonl") if c.source == "open_en"]
    if "sound" in sections:
        out["sound"] = _qwen_jsonl(corpus / "eval_sound.jsonl")
    if "instrument" in sections:
        out["instrument"] = _qwen_jsonl(corpus / "eval_instrument.jsonl")
    out = {name: limit_per_source(clips, limit) for name, clips in out.items()}
    if "voice_chat" in sections:
        asked, without = corpus_question_clips(corpus)
        if without:
            notes["voice_chat"] = ("left out, without one right answer: "
                                   + ", ".join(f"{n} {kind}" for kind, n in sorted(without.items())))
        out["voice_chat"] = limit_balanced(asked, limit) + open_question_clips(work, limit)
    return out, notes


# ---- the systems that answer ----------------------------------------------------------------------
class ModelSystem:
    """Our model through the public API: raw task prompts, voice chat (the audio alone) and typed chat."""

    def __init__(self, pipe, max_new_tokens: int = MAX_NEW_TOKENS, chat_max_new_tokens: int = CHAT_MAX_NEW_TOKENS):
        self.pipe = pipe
        self.max_new_tokens = max_new_tokens
        self.chat_max_new_tokens = chat_max_new_tokens

    def _backend(self, max_new_tokens: int):
        from ..engine.sampling import SamplingParams
        from ..eval.backends import LocalBackend

        return LocalBackend(self.pipe, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))

    def raw(self, prompts: list[str], wavs: list[np.ndarray], max_new_tokens: int | None = None) -> list[str]:
        return self._backend(max_new_tokens or self.max_new_tokens).generate("raw", list(zip(prompts, wavs)))

    def voice(self, wavs: list[np.ndarray]) -> list[str]:
        return self._backend(self.chat_max_new_tokens).generate("chat", [("", w) for w in wavs])

    def typed(self, texts: list[str]) -> list[str]:
        return self.pipe.chat_batch([[{"role": "user", "content": t}] for t in texts],
                                    max_new_tokens=self.chat_max_new_tokens, temperature=0.0)


class Runner:
    """Loads each batch's audio, calls a system on it and advances one progress bar per (section, system)."""

    def __init__(self, batch_size: int, progress: bool):
        self.batch_size = batch_size
        self.progress = progress

    def run(self, desc: str, clips: list[Clip], call, audio: bool = True) -> list[str]:
        from tqdm import tqdm

        from ..audio import load_audio

        out: list[str] = []
        with tqdm(total=len(clips), desc=desc, unit="clip", disable=not self.progress, dynamic_ncols=True,
                  leave=False) as bar:
            for i in range(0, len(clips), self.batch_size):
                batch = clips[i:i + self.batch_size]
                wavs = [load_audio(c.audio, name=c.audio) for c in batch] if audio else None
                answers = call(batch, wavs)
                if len(answers) != len(batch):
                    raise RuntimeError(f"{desc}: {len(answers)} answers for {len(batch)} clips")
                out += answers
                bar.update(len(batch))
        return out


# ---- scoring (the project's evaluator) -------------------------------------------------------------
def _records(clips: list[Clip], answers: list[str]) -> list[dict]:
    return [{"gt": c.gt, "source": c.source, "prompt": c.prompt, "response": a, "match": "key"}
            for c, a in zip(clips, answers)]


def score_asr(clips: list[Clip], answers: list[str]) -> dict:
    """Per source and pooled per unit (total edit distance / total reference units over the sources)."""
    from ..eval.tasks import score_asr as official

    sources = official(_records(clips, answers))["sources"]
    out = {s: {"n": m["n"], "unit": m["unit"], "errors": m["errors"], "ref_units": m["ref_units"], "value": m["wer"]}
           for s, m in sources.items()}
    for unit in sorted({m["unit"] for m in sources.values()}):
        group = [m for m in sources.values() if m["unit"] == unit]
        errors, units = sum(m["errors"] for m in group), sum(m["ref_units"] for m in group)
        out[f"pooled_{unit.lower()}"] = {"n": sum(m["n"] for m in group), "unit": unit, "errors": errors,
                                         "ref_units": units, "value": errors / units if units else None}
    return out


def score_labels(clips: list[Clip], answers: list[str]) -> dict:
    from ..eval.tasks import score_labels as official

    pooled = official([{**r, "source": "all"} for r in _records(clips, answers)])["sources"]["all"]
    return {"all": {"n": pooled["n"], "correct": pooled["correct"], "value": pooled["accuracy"]}}


def score_keys(clips: list[Clip], answers: list[str]) -> dict:
    """Key accuracy per source and over every corpus question, every open question, and all."""
    from ..eval.tasks import score_qa

    records = _records(clips, answers)
    out = {s: {"n": m["n"], "correct": m["correct"], "value": m["accuracy"]}
           for s, m in score_qa(records)["sources"].items()}
    for group in ("corpus", "open", "all"):
        chosen = [r for r in records if group == "all" or r["source"].startswith(group + "_")]
        if chosen:
            m = score_qa([{**r, "source": group} for r in chosen])["sources"][group]
            out[group] = {"n": m["n"], "correct": m["correct"], "value": m["accuracy"]}
    return out


def label_baselines(corpus: Path, section: str, clips: list[Clip]) -> dict:
    """Chance (one over the labels the corpus draws from) and the training split's most common label, answered
    for every clip (measured on the same clips)."""
    from ..synth import music, sounds

    labels = list(sounds.LABELS) if section == "sound" else list(music.INSTRUMENTS)
    field_of = (lambda it: it["sound"]["label"]) if section == "sound" else (lambda it: it["music"]["instrument"])
    kind = "sound" if section == "sound" else "music"
    train = Counter(field_of(it) for it in _read_jsonl(corpus / "items.jsonl")
                    if it["kind"] == kind and it["split"] == "train")
    out = {"chance": {"all": {"n": len(clips), "value": 1 / len(labels), "labels": len(labels)}}}
    if train:
        majority = train.most_common(1)[0][0]
        out["majority"] = score_labels(clips, [majority] * len(clips))
        out["majority"]["all"]["label"] = majority
    return out


# ---- the evaluation --------------------------------------------------------------------------------
def evaluate(model: ModelSystem, corpus: Path, work: Path, *, whisper=None, limit: int | None = None,
             baselines: bool = False, batch_size: int = 16, progress: bool = True, sections=SECTIONS,
             log=lambda message: print(message, file=sys.stderr, flush=True), on_section=None) -> dict:
    """The report: section -> {"n", "metric", "systems": {system: {set: figures}}, "answers": [...]}.

    `model` has raw(prompts, wavs, max_new_tokens), voice(wavs) and typed(texts); `whisper` (needed for
    --baselines) transcribe(wavs, languages, max_new_tokens). `on_section(report)` is called after each section
    (a long run keeps what it measured)."""
    corpus, work = Path(corpus), Path(work)
    if baselines and whisper is None and {"asr_real", "asr_open", "voice_chat"} & set(sections):
        raise EvaluateError("the Whisper base baselines need a Whisper system (whisper=WhisperASR())")
    complete = check_corpus(corpus)
    if not complete:
        log(f"warning: {corpus} has no manifest.json: its build has not finished, the held-out sets may be partial")
    clips, notes = section_clips(corpus, work, limit, sections)
    run = Runner(batch_size, progress).run
    mnt = model.max_new_tokens if hasattr(model, "max_new_tokens") else MAX_NEW_TOKENS
    report = {"corpus": str(corpus), "corpus_complete": complete, "limit": limit, "baselines": baselines,
              "max_new_tokens": {"asr": mnt, "labels": LABEL_MAX_NEW_TOKENS,
                                 "chat": getattr(model, "chat_max_new_tokens", CHAT_MAX_NEW_TOKENS)},
              "sections": {}}
    started = time.time()
    for name in sections:
        cs = clips.get(name, [])
        section: dict = {"n": len(cs), "systems": {}, "answers": []}
        if notes.get(name):
            section["note"] = notes[name]
        report["sections"][name] = section
        if not cs:
            log(f"{name}: no held-out clips in the corpus")
            continue
        answers: dict[str, list] = {}
        if name.startswith("asr"):
            section["metric"] = "WER"
            answers["model"] = run(f"{name}: model", cs, lambda b, w: model.raw([c.prompt for c in b], w))
            if baselines:
                answers["whisper"] = run(f"{name}: Whisper base", cs,
                                         lambda b, w: whisper.transcribe(w, [c.language for c in b], mnt))
            section["systems"] = {s: score_asr(cs, a) for s, a in answers.items()}
        elif name in ("sound", "instrument"):
            section["metric"] = "accuracy"
            answers["model"] = run(f"{name}: model", cs,
                                   lambda b, w: model.raw([c.prompt for c in b], w, LABEL_MAX_NEW_TOKENS))
            section["systems"] = {"model": score_labels(cs, answers["model"]), **label_baselines(corpus, name, cs)}
        else:
            section["metric"] = "key accuracy"
            answers["model"] = run(f"{name}: model (spoken)", cs, lambda b, w: model.voice(w))
            if baselines:
                answers["typed"] = run(f"{name}: typed", cs, lambda b, w: model.typed([c.text for c in b]), audio=False)
                answers["transcript"] = run(f"{name}: Whisper base", cs,
                                            lambda b, w: whisper.transcribe(w, ["en"] * len(b), mnt))
                heard = {id(c): t for c, t in zip(cs, answers["transcript"])}
                answers["cascade"] = run(f"{name}: cascade", cs, lambda b, w: model.typed([heard[id(c)] for c in b]),
                                         audio=False)
            section["systems"] = {s: score_keys(cs, a) for s, a in answers.items() if s != "transcript"}
        section["answers"] = [{"audio": c.audio, "source": c.source, "gt": c.gt, **({"text": c.text} if c.text else {}),
                               **{s: a[i] for s, a in answers.items()}} for i, c in enumerate(cs)]
        log(f"{name}: {len(cs)} clips, {time.time() - started:.0f} s so far")
        if on_section is not None:
            report["seconds"] = round(time.time() - started, 1)
            on_section(report)
    report["seconds"] = round(time.time() - started, 1)
    return report


# ---- the report as a table -------------------------------------------------------------------------
def _pct(figure: dict | None) -> str:
    return "—" if not figure or figure.get("value") is None else f"{100 * figure['value']:.1f}"


def table_rows(report: dict) -> list[list[str]]:
    """(task, clips, metric, this model, baselines) rows; figures in %."""
    rows = []
    sections = report["sections"]

    def baselines(systems: dict, key: str, names) -> str:
        parts = [f"{SYSTEM_NAMES[s]} {_pct(systems[s].get(key))}" for s in names if s in systems]
        return ", ".join(parts) or "—"

    s = sections.get("asr_real")
    if s and s["systems"]:
        sys_ = s["systems"]
        for key, label in [("asterisk_en", "English")] + [("pooled_wer", "5 languages pooled")]:
            if key in sys_["model"]:
                rows.append([f"ASR, real recordings (Asterisk), {label}", str(sys_["model"][key]["n"]), "WER %",
                             _pct(sys_["model"][key]), baselines(sys_, key, ["whisper"])])
        for lang, name in ASTERISK_LANGUAGES.items():
            key = f"asterisk_{lang}"
            if lang != "en" and key in sys_["model"]:
                rows.append([f"ASR, real recordings (Asterisk), {name}", str(sys_["model"][key]["n"]),
                             f"{sys_['model'][key]['unit']} %", _pct(sys_["model"][key]),
                             baselines(sys_, key, ["whisper"])])
    s = sections.get("asr_open")
    if s and s["systems"]:
        rows.append(["ASR, open-vocabulary English sentences (TTS)", str(s["n"]), "WER %",
                     _pct(s["systems"]["model"].get("open_en")), baselines(s["systems"], "open_en", ["whisper"])])
    for name, label in (("sound", "Sound events (label)"), ("instrument", "Instruments (label)")):
        s = sections.get(name)
        if s and s["systems"]:
            rows.append([label, str(s["n"]), "accuracy %", _pct(s["systems"]["model"]["all"]),
                         baselines(s["systems"], "all", ["chance", "majority"])])
    s = sections.get("voice_chat")
    if s and s["systems"]:
        for key, label in (("corpus", "Voice chat, the corpus's held-out spoken questions"),
                           ("open", "Voice chat, open questions (openqa.py)")):
            if key in s["systems"]["model"]:
                rows.append([label, str(s["systems"]["model"][key]["n"]), "answered right %",
                             _pct(s["systems"]["model"][key]), baselines(s["systems"], key, ["typed", "cascade"])])
    return rows


def render_markdown(report: dict, title: str | None = None) -> str:
    name = title or report.get("model_name") or "this model"
    lines = [f"| task (held-out clips) | clips | metric | {name} | baselines, same clips |",
             "|---|---:|---|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    limit = report.get("limit")
    lines += ["", f"Measured {report.get('date', '')} on {report.get('corpus', 'the corpus')}"
                  f"{f', at most {limit} clips per set and language' if limit else ''}, greedy decoding"
                  f"{'' if report.get('corpus_complete', True) else ' (corpus build unfinished)'}: "
                  f"`{report.get('command', 'python -m qwen2audio.bundle.evaluate')}`."]
    notes = [f"{name}: {s['note']}" for name, s in report["sections"].items() if s.get("note")]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def update_card(card: Path, block: str) -> None:
    """Replace what stands between the card's evaluation markers with `block`."""
    text = card.read_text(encoding="utf-8")
    start, end = text.find(CARD_START), text.find(CARD_END)
    if start < 0 or end < start:
        raise EvaluateError(f"{card} has no {CARD_START} ... {CARD_END} block to rewrite")
    text = text[:start + len(CARD_START)] + "\n" + block.strip("\n") + "\n" + text[end:]
    tmp = card.with_name(f".{card.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, card)


# ---- command line ----------------------------------------------------------------------------------
DESCRIPTION = __doc__.split("\n\n", 1)[0] + """

Held-out clips of the corpus the default model is trained on, or never trained on at all (the open questions):
ASR of real recordings in five languages and of open-vocabulary English sentences (WER), sound-event and instrument
labels (accuracy), and voice chat (spoken questions, right when the answer names the key word). Each figure stands
beside the baselines measured on the same clips: Whisper base alone on ASR, the question typed and the cascade
Whisper base -> typed on voice chat (--baselines), chance and the majority label on the labels."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import positive_int

    p.add_argument("--model", metavar="DIR", default=None,
                   help="checkpoint directory (default: the default model, assembled when missing)")
    p.add_argument("--corpus", metavar="DIR", type=Path, default=None,
                   help=f"corpus built by `qwen2audio synth` (default: {default_corpus()}, where the default model's "
                        "training builds it)")
    p.add_argument("--work", metavar="DIR", type=Path, default=None,
                   help="where the open questions are spoken once and kept (default: $QWEN2AUDIO_HOME/open-qa)")
    p.add_argument("--limit", metavar="N", type=positive_int, default=None,
                   help="at most N clips per set: each language of the Asterisk recordings, the open sentences, the "
                        "sounds, the instruments, and N of the corpus's spoken questions and N open questions (their "
                        "kinds in turn); spread evenly over each set; default: every held-out clip")
    p.add_argument("--baselines", action="store_true",
                   help="also run Whisper base on the ASR sections, and the typed and Whisper base -> typed "
                        "baselines on voice chat (Whisper needs ctranslate2)")
    p.add_argument("--sections", metavar="LIST", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default: all: {','.join(SECTIONS)})")
    p.add_argument("--batch-size", metavar="N", type=positive_int, default=16, help="clips per batch (default: 16)")
    p.add_argument("--max-new-tokens", metavar="N", type=positive_int, default=MAX_NEW_TOKENS,
                   help=f"ASR tokens at most, for the model and Whisper alike (default: {MAX_NEW_TOKENS})")
    p.add_argument("--chat-max-new-tokens", metavar="N", type=positive_int, default=CHAT_MAX_NEW_TOKENS,
                   help=f"tokens of a voice-chat or typed answer at most (default: {CHAT_MAX_NEW_TOKENS})")
    p.add_argument("--threads", metavar="N", type=int, default=0,
                   help="CPU threads for torch and Whisper (default: 0, the libraries' own choice)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, the checkpoint's on GPU), float32, "
                   "bfloat16 or float16")
    p.add_argument("--json", metavar="OUT", type=Path, default=None,
                   help="write the whole report (figures per set and system, every answer) as JSON")
    p.add_argument("--card", action="store_true",
                   help="rewrite the evaluation table of the default model's card "
                        "(qwen2audio/assets/default_model/README.md, between its evaluation markers)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from .assemble import CARD_FILE, default_model_dir, home

    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise EvaluateError(f"--sections: unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(SECTIONS)}")
    corpus = args.corpus or default_corpus()
    check_corpus(corpus)  # before minutes of loading
    if args.model is not None and not Path(args.model).is_dir():
        raise EvaluateError(f"--model {args.model}: no such directory")
    if args.card and not CARD_FILE.is_file():
        raise EvaluateError(f"--card: {CARD_FILE} is missing")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    whisper = None
    if args.baselines and ({"asr_real", "asr_open", "voice_chat"} & set(sections)):
        from .whisper_asr import WhisperASR

        whisper = WhisperASR(threads=args.threads)
    from .. import api
    from ..cli import resolve_device

    pipe = api.load(args.model, device=resolve_device(args.device), dtype=args.dtype, progress=not args.no_progress)
    model_dir = Path(args.model) if args.model else default_model_dir()
    system = ModelSystem(pipe, args.max_new_tokens, args.chat_max_new_tokens)
    is_default = model_dir.resolve() == default_model_dir().resolve()
    argv = getattr(args, "argv", None)
    command = (f"python -m qwen2audio.bundle.evaluate {shlex.join(argv)}" if argv is not None
               else f"qwen2audio {shlex.join(sys.argv[1:])}")
    about = dict(model=str(model_dir), model_name="qwen2audio-default" if is_default else model_dir.name,
                 date=time.strftime("%Y-%m-%d", time.gmtime()), command=command.strip())

    def save(report: dict) -> None:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.json.with_name(f".{args.json.name}.tmp")
            tmp.write_text(json.dumps({**about, **report}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, args.json)

    report = evaluate(system, corpus, args.work or home() / "open-qa", whisper=whisper, limit=args.limit,
                      baselines=args.baselines, batch_size=args.batch_size, progress=not args.no_progress,
                      sections=sections, on_section=save)
    report = {**about, **report}
    save(report)
    table = render_markdown(report)
    print(table)
    if args.json:
        print(f"wrote {args.json}", file=sys.stderr)
    if args.card:
        update_card(CARD_FILE, table)
        print(f"rewrote the evaluation table of {CARD_FILE}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2audio.bundle.evaluate", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv
    try:
        return run(args)
    except (Qwen2AudioError, OSError) as e:  # one line, as the qwen2audio command reports them; a bug keeps its traceback
        print(f"{p.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
