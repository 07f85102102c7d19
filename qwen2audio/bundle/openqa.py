"""Held-out open questions for voice chat, each with the key words a right answer contains.

Nothing here is trained on: the recipe's voice-chat training questions come from `synth.questions`
(arithmetic drawn from its training side only) and from fortune sentences. Arithmetic here is drawn
from the held-out side of the same split; the other questions are written here and appear nowhere
else. A free-form answer is right when it contains one of the keys as whole words (`eval` task
`audio-qa` with `"match": "key"`), so "Seven plus nine is sixteen." and "16" both count.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..synth import questions, tts
from ..synth.dsp import normalize_peak
from ..synth.split import split_of

GEOGRAPHY = [
    ("What is the capital of Iceland?", ["reykjavik"]),
    ("On which continent is Egypt?", ["africa"]),
    ("What is the capital of the Philippines?", ["manila"]),
    ("What is the capital of Iran?", ["tehran"]),
    ("What is the capital of New Zealand?", ["wellington"]),
    ("What is the capital of Saudi Arabia?", ["riyadh"]),
    ("What is the capital of Colombia?", ["bogota", "bogotá"]),
    ("In which country is the Great Wall?", ["china"]),
    ("What is the smallest continent?", ["australia", "oceania"]),
    ("Which country has the city of Rome as its capital?", ["italy"]),
    ("What is the longest river in Africa?", ["nile"]),
    ("On which continent is Brazil?", ["south america"]),
    ("What is the highest mountain in the world?", ["everest"]),
    ("Which country is famous for the Eiffel Tower?", ["france"]),
    ("What is the largest country in the world by area?", ["russia"]),
    ("In which country is the city of Barcelona?", ["spain"]),
    ("Which river flows through London?", ["thames"]),
    ("Which country is home to the kangaroo?", ["australia"]),
    ("Which ocean lies between Europe and North America?", ["atlantic"]),
    ("What is the largest desert in Africa?", ["sahara"]),
]
SCIENCE = [
    ("What planet do we live on?", ["earth"]),
    ("What is the chemical symbol for water?", ["h2o", "h 2 o"]),
    ("What gas do plants take in from the air?", ["carbon dioxide", "co2"]),
    ("Which planet is closest to the sun?", ["mercury"]),
    ("What do caterpillars turn into?", ["butterfly", "butterflies", "moth"]),
    ("What is the freezing point of water in degrees Celsius?", ["zero", "0"]),
    ("What is the boiling point of water in degrees Celsius?", ["one hundred", "100"]),
    ("Which planet is known as the red planet?", ["mars"]),
    ("What do we call animals that eat only plants?", ["herbivore", "herbivores"]),
    ("What organ pumps blood through the body?", ["heart"]),
    ("What is the center of an atom called?", ["nucleus"]),
    ("How many legs does an insect have?", ["six", "6"]),
    ("What force pulls objects towards the ground?", ["gravity"]),
    ("What is the hardest natural material?", ["diamond"]),
    ("Which gas do humans need to breathe to live?", ["oxygen"]),
    ("What is the largest mammal in the world?", ["blue whale", "whale"]),
    ("What natural satellite orbits the Earth?", ["moon"]),
    ("How many planets are in our solar system?", ["eight", "8"]),
    ("What is the largest organ of the human body?", ["skin"]),
    ("What part of the plant makes food from sunlight?", ["leaf", "leaves"]),
]
EVERYDAY = [
    ("How many days are there in a leap year?", ["three hundred sixty six", "three hundred and sixty-six", "366"]),
    ("How many legs does a cat have?", ["four", "4"]),
    ("What color is fresh snow?", ["white"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("What color are bananas when they are ripe?", ["yellow"]),
    ("What do you call a baby sheep?", ["lamb"]),
    ("What do you call a baby cat?", ["kitten"]),
    ("What do you call a baby dog?", ["puppy", "pup"]),
    ("Which animal says moo?", ["cow"]),
    ("Which fruit is used to make wine?", ["grape", "grapes"]),
    ("How many wheels does a bicycle have?", ["two", "2"]),
    ("What do people use to write on a blackboard?", ["chalk"]),
    ("Which meal do people eat in the morning?", ["breakfast"]),
    ("How many seconds are there in a minute?", ["sixty", "60"]),
    ("What is the first month of the year?", ["january"]),
    ("What do you call the day after Friday?", ["saturday"]),
    ("What color do you get when you mix blue and yellow?", ["green"]),
    ("What do you use to cut paper?", ["scissors"]),
    ("What season comes after winter?", ["spring"]),
    ("How many players does a soccer team have on the field?", ["eleven", "11"]),
]
ARITHMETIC_COUNT = 20
CATEGORIES = {"geography": GEOGRAPHY, "science": SCIENCE, "everyday": EVERYDAY}


def _number_keys(n: int) -> list[str]:
    from ..synth.sentences import number_words

    return [str(n), number_words(n)] if 0 <= n < 1000 else [str(n)]


def arithmetic_questions(seed: int = 0) -> list[tuple[str, list[str]]]:
    """Arithmetic from the held-out side of `synth.questions`' split (never spoken in training)."""
    rng = np.random.default_rng([seed, 1799])
    out, seen = [], set()
    while len(out) < ARITHMETIC_COUNT:
        q = questions.arithmetic(rng)
        if split_of(q["key"]) != "heldout" or q["question"] in seen:
            continue
        seen.add(q["question"])
        out.append((q["question"], _number_keys(int(q["result"]))))
    return out


def all_questions(seed: int = 0) -> list[dict]:
    rows = [{"category": "arithmetic", "question": q, "keys": k} for q, k in arithmetic_questions(seed)]
    templates = {q["question"].casefold() for q in questions.every_question()}
    for category, items in CATEGORIES.items():
        clash = [q for q, _ in items if q.casefold() in templates]
        if clash:  # a template question may be trained on: it would not measure open questions
            raise ValueError(f"open questions also made by synth.questions: {clash}")
        rows += [{"category": category, "question": q, "keys": k} for q, k in items]
    return rows


def write_eval_set(out_dir: str | Path, seed: int = 0, engines=("espeak", "flite", "festival"),
                   indices=None) -> Path:
    """Speak every question (a seeded voice each) into OUT/audio/ and write OUT/eval_open_qa.jsonl
    (audio-qa, voice chat, key match; the spoken words in "text"). `indices`: only those questions (of
    all_questions' order), each with the same voice and file as in the whole set. Clips already there are kept."""
    import soundfile as sf

    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 4242])
    rows = []
    for i, row in enumerate(all_questions(seed)):
        audio = out_dir / "audio" / f"open-qa-{i:03d}.wav"
        voice = tts.choose_voice(rng, "en", list(engines))  # drawn for every question: the same voice either way
        if indices is not None and i not in indices:
            continue
        if not audio.exists():
            wav = normalize_peak(tts.speak(row["question"], voice), -3.0)
            tmp = audio.with_name(f".{audio.stem}.{os.getpid()}.tmp.wav")  # two runs may speak the same set at once
            sf.write(tmp, wav, 16000, subtype="PCM_16")
            os.replace(tmp, audio)
        rows.append({"audio": f"audio/{audio.name}", "question": "", "gt": row["keys"], "match": "key",
                     "source": f"spoken_{row['category']}", "text": row["question"]})
    path = out_dir / "eval_open_qa.jsonl"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def typed_baseline(model_dir: str | Path, eval_jsonl: str | Path, transcripts: dict[str, str] | None = None,
                   batch_size: int = 16, max_new_tokens: int = 64) -> dict:
    """Key accuracy per source when the questions are typed instead of spoken: the LLM's own ceiling.
    With `transcripts` (text -> what an ASR system heard) it is the cascade ASR -> the same LLM instead."""
    from ..api import load
    from ..eval.metrics import key_accuracy

    rows = [json.loads(line) for line in Path(eval_jsonl).read_text(encoding="utf-8").splitlines() if line.strip()]
    pipe = load(model_dir, progress=False)
    answers = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        texts = [(transcripts or {}).get(r["text"], r["text"]) for r in chunk]
        answers += pipe.chat_batch([[{"role": "user", "content": t}] for t in texts], max_new_tokens=max_new_tokens)
    out = {}
    for source in sorted({r["source"] for r in rows}):
        pairs = [(r["gt"], a) for r, a in zip(rows, answers) if r["source"] == source]
        out[source] = key_accuracy([g for g, _ in pairs], [a for _, a in pairs])
    out["all"] = key_accuracy([r["gt"] for r in rows], answers)
    return out
