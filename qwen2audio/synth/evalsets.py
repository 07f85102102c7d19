"""Held-out evaluation sets of a corpus, in the formats `qwen2audio eval` reads.

From the held-out split only (items.jsonl and heldout.jsonl), next to the corpus's audio folder:

    eval_asr_synth.jsonl    asr       TTS speech, one source per language (synth_en, synth_fr, ...)
    eval_asr_open.jsonl     asr       TTS speech of open-vocabulary (fortune) sentences (open_en, open_de, ...)
    eval_asr_real.jsonl     asr       Asterisk human recordings (asterisk_en, ...)
    eval_sound.jsonl        vsc       generated sound events: the label
    eval_instrument.jsonl   vsc       fluidsynth music: the instrument
    eval_voice_chat.jsonl   audio-qa  held-out spoken questions, alone or over sound/music (no text
                                      question), one source per question kind (spoken_arithmetic, ...)
    eval_voice_chat_known.jsonl  audio-qa  training-side questions in new recordings (see below)
    eval_analysis.jsonl     audio-qa  single-turn audio + text questions, one source per audio kind

ASR and classification use the base model's raw task prompts (the paper's protocol for those
tasks); the audio-qa sets are asked in the chat template, as the instruction-tuned model is.

Held-out questions are new *content*: a held-out capital, fact, opposite or greeting is one the
model was never told, so those kinds measure nothing but luck. The "known" set asks questions from
the training side in recordings rendered only for it (own seeds, so own voice choices, speeds, rooms
and noises; the text and the TTS voice can still coincide with a training item): it measures
understanding a new recording of something the model was taught, which is what a user of a
closed-world model (such as the project's retired from-scratch model) does.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..chat import AUDIO_BLOCK, asr_prompt
from . import plan, questions, render, tts
from .records import PROMPTS
from .split import key_hash

EVAL_SETS = {"asr_synth": "asr", "asr_real": "asr", "asr_open": "asr", "sound": "vsc", "instrument": "vsc", "voice_chat": "audio-qa",
             "voice_chat_known": "audio-qa", "analysis": "audio-qa"}  # name -> `qwen2audio eval --task`
KNOWN_QUESTIONS = 100


def eval_file(root: str | Path, name: str) -> Path:
    return Path(root) / f"eval_{name}.jsonl"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _from_items(items: list[dict]) -> dict[str, list[dict]]:
    sets: dict[str, list[dict]] = {"asr_synth": [], "asr_real": [], "asr_open": [], "sound": [], "instrument": []}
    for it in items:
        if it["split"] != "heldout":
            continue
        kind = it["kind"]
        if kind in ("speech", "asterisk", "open"):
            name, source = {"speech": ("asr_synth", "synth"), "asterisk": ("asr_real", "asterisk"),
                            "open": ("asr_open", "open")}[kind]
            sets[name].append({"audio": it["audio"], "prompt": AUDIO_BLOCK + asr_prompt(it["language"]),
                               "source": f"{source}_{it['language']}", "gt": it["text"]})
        elif kind == "sound":
            sets["sound"].append({"audio": it["audio"], "prompt": AUDIO_BLOCK + PROMPTS["sound"],
                                  "source": "synth_sounds", "gt": it["sound"]["label"]})
        elif kind == "music":
            sets["instrument"].append({"audio": it["audio"], "prompt": AUDIO_BLOCK + PROMPTS["instrument"],
                                       "source": "synth_instruments", "gt": it["music"]["instrument"]})
    return sets


def _from_conversations(records: list[dict], items: list[dict]) -> dict[str, list[dict]]:
    """Single-turn, one-audio held-out SFT records: '<audio>' alone is voice chat, else analysis."""
    question_kind = {it["audio"]: it["question"]["kind"] for it in items if "question" in it}
    sets: dict[str, list[dict]] = {"voice_chat": [], "analysis": []}
    for rec in records:
        messages, audios = rec.get("messages", []), rec.get("audios", [])
        if len(messages) != 2 or len(audios) != 1 or not all(isinstance(m["content"], str) for m in messages):
            continue
        user, answer = messages[0]["content"], messages[1]["content"]
        if not user.startswith("<audio>") or user.count("<audio>") != 1:
            continue
        kind = Path(audios[0]).parts[1]  # audio/<kind>/<file> or audio/asterisk/<language>/<file>
        question = user[len("<audio>"):]
        if question:
            sets["analysis"].append({"audio": audios[0], "question": question, "source": f"analysis_{kind}",
                                     "gt": answer})
        else:
            source = f"spoken_{question_kind[audios[0]]}" + ("_over_background" if kind == "mixture" else "")
            sets["voice_chat"].append({"audio": audios[0], "question": "", "source": source, "gt": answer})
    return sets


def known_question_specs(count: int, seed: int, engines: list[str]) -> list[dict]:
    """Render specs of `count` spoken questions from the training side, seeded apart from the corpus."""
    rng = plan._rng(seed, "chat-known")
    specs = []
    for i in range(count):
        item_id = f"chat-known-{i:06d}"
        q = questions.question(rng, heldout=False)
        specs.append({"id": item_id, "kind": "chat", "split": "eval", "seed": key_hash(f"{seed}:{item_id}") % 2**63,
                      "audio": f"audio/chat_known/{item_id}.wav", "language": "en", "question": q,
                      "voice": tts.choose_voice(rng, "en", engines), "aug": plan._augmentation(rng),
                      "gain_db": round(float(rng.uniform(-12, -1)), 1)})
    return specs


def _known_questions(root: Path, count: int, seed: int, engines: list[str]) -> list[dict]:
    rows = []
    for spec in known_question_specs(count, seed, engines):
        render.render_item(spec, str(root), None)  # kept when already there
        rows.append({"audio": spec["audio"], "question": "", "source": f"known_{spec['question']['kind']}",
                     "gt": spec["question"]["answer"]})
    return rows


def write_eval_sets(root: str | Path) -> dict[str, int]:
    """Write every eval_*.jsonl of the corpus in `root` (overwriting); returns name -> item count.

    The known-question clips (as many as the corpus has chat items, at most KNOWN_QUESTIONS) are
    rendered with the seed and TTS sources of the corpus's build.json, kept when already there."""
    root = Path(root)
    items = _read_jsonl(root / "items.jsonl")
    sets = {**_from_items(items), **_from_conversations(_read_jsonl(root / "heldout.jsonl"), items)}
    settings = json.loads((root / "build.json").read_text())
    engines = [e for e in plan.TTS_SOURCES if e in settings["sources"]]
    count = min(KNOWN_QUESTIONS, settings["counts"].get("chat", 0)) if engines else 0
    sets["voice_chat_known"] = _known_questions(root, count, settings["seed"], engines)
    counts = {}
    for name in EVAL_SETS:
        rows = sets[name]
        eval_file(root, name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
        counts[name] = len(rows)
    return counts
