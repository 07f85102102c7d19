"""Held-out evaluation sets of a corpus, in the formats `qwen2audio eval` reads.

From the held-out split only (items.jsonl and heldout.jsonl), next to the corpus's audio folder:

    eval_asr_synth.jsonl    asr       TTS speech, one source per language (synth_en, synth_fr, ...)
    eval_asr_real.jsonl     asr       Asterisk human recordings (asterisk_en, ...)
    eval_sound.jsonl        vsc       generated sound events: the label
    eval_instrument.jsonl   vsc       fluidsynth music: the instrument
    eval_voice_chat.jsonl   audio-qa  spoken questions, alone or over sound/music (no text question)
    eval_analysis.jsonl     audio-qa  single-turn audio + text questions, one source per audio kind

ASR and classification use the base model's raw task prompts (the paper's protocol for those
tasks); the two audio-qa sets are asked in the chat template, as the instruction-tuned model is.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..chat import AUDIO_BLOCK, asr_prompt
from .records import PROMPTS

EVAL_SETS = {"asr_synth": "asr", "asr_real": "asr", "sound": "vsc", "instrument": "vsc", "voice_chat": "audio-qa",
             "analysis": "audio-qa"}  # name -> `qwen2audio eval --task`


def eval_file(root: str | Path, name: str) -> Path:
    return Path(root) / f"eval_{name}.jsonl"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _from_items(items: list[dict]) -> dict[str, list[dict]]:
    sets: dict[str, list[dict]] = {"asr_synth": [], "asr_real": [], "sound": [], "instrument": []}
    for it in items:
        if it["split"] != "heldout":
            continue
        kind = it["kind"]
        if kind in ("speech", "asterisk"):
            name, source = ("asr_synth", "synth") if kind == "speech" else ("asr_real", "asterisk")
            sets[name].append({"audio": it["audio"], "prompt": AUDIO_BLOCK + asr_prompt(it["language"]),
                               "source": f"{source}_{it['language']}", "gt": it["text"]})
        elif kind == "sound":
            sets["sound"].append({"audio": it["audio"], "prompt": AUDIO_BLOCK + PROMPTS["sound"],
                                  "source": "synth_sounds", "gt": it["sound"]["label"]})
        elif kind == "music":
            sets["instrument"].append({"audio": it["audio"], "prompt": AUDIO_BLOCK + PROMPTS["instrument"],
                                       "source": "synth_instruments", "gt": it["music"]["instrument"]})
    return sets


def _from_conversations(records: list[dict]) -> dict[str, list[dict]]:
    """Single-turn, one-audio held-out SFT records: '<audio>' alone is voice chat, else analysis."""
    sets: dict[str, list[dict]] = {"voice_chat": [], "analysis": []}
    for rec in records:
        messages, audios = rec.get("messages", []), rec.get("audios", [])
        if len(messages) != 2 or len(audios) != 1 or not all(isinstance(m["content"], str) for m in messages):
            continue
        user, answer = messages[0]["content"], messages[1]["content"]
        if not user.startswith("<audio>") or user.count("<audio>") != 1:
            continue
        kind = Path(audios[0]).parent.name  # audio/<kind>/<file>
        question = user[len("<audio>"):]
        if question:
            sets["analysis"].append({"audio": audios[0], "question": question, "source": f"analysis_{kind}",
                                     "gt": answer})
        else:
            source = "spoken_question_over_background" if kind == "mixture" else "spoken_question"
            sets["voice_chat"].append({"audio": audios[0], "question": "", "source": source, "gt": answer})
    return sets


def write_eval_sets(root: str | Path) -> dict[str, int]:
    """Write every eval_*.jsonl of the corpus in `root` (overwriting); returns name -> item count."""
    root = Path(root)
    sets = {**_from_items(_read_jsonl(root / "items.jsonl")), **_from_conversations(_read_jsonl(root / "heldout.jsonl"))}
    counts = {}
    for name in EVAL_SETS:
        rows = sets[name]
        eval_file(root, name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                         encoding="utf-8")
        counts[name] = len(rows)
    return counts
