"""The training data of the default model: one JSONL mixing the paper's stages for a frozen LLM.

With the LLM and the encoder frozen, pre-training (raw task prompts) and SFT (chat) train the same
projector, so they are one mixture, trained together:

- pre-training task records of the corpus: ASR in six languages (TTS of open-vocabulary fortune
  sentences and of questions, and the real Asterisk recordings), language, sound and instrument
  labels, captions: the paper's natural-language prompts;
- the corpus's audio-analysis conversations ("Transcribe this audio.", "What's that sound?");
- voice chat, behaviour-aligned: a spoken question or sentence alone, answered with what the frozen
  LLM answers when the same words are typed (`answers.py`). A record whose text has no usable
  answer is left out.

A corpus still being rendered can be snapshotted (`snapshot_corpus`): its rendered items get their
records now, and the finished build later rewrites the same files for every item.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..synth.records import is_voice_chat


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def spoken_text(item: dict) -> str | None:
    """What an item's speaker says, for the kinds that are speech."""
    if item["kind"] in ("chat", "mixture"):
        return item["question"]["question"]
    if item["kind"] in ("open", "speech", "asterisk"):
        return item["text"]
    return None


def voice_chat_texts(corpus: str | Path, open_share: float = 0.5, seed: int = 0) -> list[str]:
    """The training-side texts whose LLM answers the mixture uses: every question, and `open_share` of
    the English open-vocabulary sentences (a seeded choice)."""
    items = _read_jsonl(Path(corpus) / "items.jsonl")
    questions = [spoken_text(it) for it in items if it["split"] == "train" and it["kind"] in ("chat", "mixture")]
    sentences = [it["text"] for it in items if it["split"] == "train" and it["kind"] == "open" and it["language"] == "en"]
    rng = random.Random(seed)
    chosen = [s for s in sentences if rng.random() < open_share]
    return list(dict.fromkeys(questions + chosen))


def _voice_chat(audio: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": "<audio>"}, {"role": "assistant", "content": answer}],
            "audios": [audio]}


def build_mixture(corpus: str | Path, answers: dict[str, str | None], name: str = "default_mixture",
                  open_share: float = 0.5, seed: int = 0) -> tuple[Path, dict]:
    """Write CORPUS/NAME.jsonl (shuffled, seeded) and return it with counts per record type."""
    corpus = Path(corpus)
    items = {it["audio"]: it for it in _read_jsonl(corpus / "items.jsonl")}
    rows: list[dict] = []
    counts = {"pretrain": 0, "analysis": 0, "voice_chat": 0, "voice_chat_no_answer": 0}
    for rec in _read_jsonl(corpus / "pretrain_train.jsonl"):
        rows.append(rec)
        counts["pretrain"] += 1
    for rec in _read_jsonl(corpus / "train.jsonl"):
        if not is_voice_chat(rec):
            rows.append(rec)
            counts["analysis"] += 1
            continue
        answer = answers.get(spoken_text(items[rec["audios"][0]]) or "")
        if answer:
            rows.append(_voice_chat(rec["audios"][0], answer))
            counts["voice_chat"] += 1
        else:
            counts["voice_chat_no_answer"] += 1
    rng = random.Random(seed)
    for audio, it in items.items():
        if it["split"] == "train" and it["kind"] == "open" and it["language"] == "en" and rng.random() < open_share:
            answer = answers.get(it["text"])
            if answer:
                rows.append(_voice_chat(audio, answer))
                counts["voice_chat"] += 1
    random.Random(seed + 1).shuffle(rows)
    out = corpus / f"{name}.jsonl"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    return out, counts


def snapshot_corpus(corpus: str | Path) -> int:
    """Write the record files of a corpus whose build is still rendering, for the items already rendered
    (their audio complete on disk). Returns how many items that is."""
    from ..synth import plan
    from ..synth.build import write_outputs
    from ..synth.render import existing_duration

    corpus = Path(corpus)
    settings = json.loads((corpus / "build.json").read_text())
    specs = plan.make_plan(settings["counts"], settings["seed"], set(settings["sources"]))
    done, durations = [], {}
    for spec in specs:
        duration = existing_duration(corpus / spec["audio"])
        if duration is not None:
            done.append(spec)
            durations[spec["id"]] = duration
    write_outputs(corpus, done, durations, settings["seed"])
    return len(done)
