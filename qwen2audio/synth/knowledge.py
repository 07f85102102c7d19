"""Text-only knowledge chats: the closed world's answers, taught to the decoder without audio.

Qwen2-Audio's LLM starts from a text-pretrained Qwen that already knows that the capital of Greece
is Athens and that sixteen minus eight is eight; voice chat only has to hear the question. Our small
decoder starts from random weights and would have to learn every fact from a few spoken questions.
So the corpus also carries every *training-side* question of `questions.py` as a plain text chat
(user question -> answer), which costs a fraction of an audio record to train on. Held-out keys
never appear here, so the held-out voice-chat set stays unseen content.

    {"messages": [{"role": "user", "content": "What is sixteen minus eight?"},
                  {"role": "assistant", "content": "16 minus 8 is 8."}]}

Each answer also comes as a *statement*, after a user turn that does not name the question ("Tell me
a fact."). In voice chat the question is only in the audio, but the answer restates it ("The capital
of Greece is ..."): a model that learned the facts only as replies to written questions looks the
answer up in the question's text, which voice chat does not have. Statements teach the completion
from the answer's own opening words, which voice chat has.

Measured on the pre-trained base of the project's earlier from-scratch model (since retired): after this stage the
model answers about half of a sample of typed training questions, but with SFT seeing each voice-chat
record once, accuracy on known *spoken* questions did not rise (13 % with question-answer chats, 9 %
with statements too, 9 % without the stage), and SFT forgot most typed answers (19 -> 8 of 36). With
each voice-chat record four times in SFT it reached 47 %; how much of that this stage contributes was
not measured on its own. Mixing every knowledge chat into SFT kept more of them: typed answers to 166
training-side questions went 80 after this stage -> 39 after SFT with a fifth of them mixed in -> 62 with
all of them. The shipped model's sixth SFT leg went through them all again (the few sequence and spelling
keys eight times), with the spoken questions: 150 of 166 typed, and known spoken questions 52 -> 74 %.
"""

from __future__ import annotations

import json
from collections import Counter
from math import ceil
from pathlib import Path

import numpy as np

from . import questions
from .split import is_heldout

KNOWLEDGE_FILE = "knowledge_train.jsonl"
MIN_RECORDS_PER_KEY = 5  # a fact with one wording is written 5 times, as often as a sum with its 5 wordings
REPEAT_RECORDS = 600  # "repeat after me" with training-side sentences: the copying habit, not facts
STATEMENT_PROMPTS = ("Tell me a fact.", "Tell me something you know.", "Say one thing you know.", "Go on.")
STATEMENT_KINDS = ("arithmetic", "capital", "fact", "spell", "sequence", "opposite")  # answers that restate the question


def _chat(q: dict) -> dict:
    return {"messages": [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": q["answer"]}]}


def knowledge_records(seed: int = 0) -> list[dict]:
    """Every training-side question in every wording (rare keys repeated), the same answers as
    statements, plus "repeat after me" chats, in a seeded order."""
    rng = np.random.default_rng([seed, 11])
    train_side = [q for q in questions.every_question() if not is_heldout(q["key"])]
    copies = {key: ceil(MIN_RECORDS_PER_KEY / n) for key, n in Counter(q["key"] for q in train_side).items()}
    records = [_chat(q) for q in train_side for _ in range(copies[q["key"]])]
    # One statement per wording: the same count per key as the question-answer chats.
    records += [_chat({"question": STATEMENT_PROMPTS[int(rng.integers(len(STATEMENT_PROMPTS)))], "answer": q["answer"]})
                for q in train_side if q["kind"] in STATEMENT_KINDS for _ in range(copies[q["key"]])]
    repeats = 0
    while repeats < REPEAT_RECORDS:
        q = questions.repeat(rng)
        if not is_heldout(q["key"]):
            records.append(_chat(q))
            repeats += 1
    return [records[i] for i in rng.permutation(len(records))]


def write_knowledge(root: str | Path, seed: int = 0) -> int:
    """Write ROOT/knowledge_train.jsonl; returns its number of records."""
    path = Path(root) / KNOWLEDGE_FILE
    records = knowledge_records(seed)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)
    return len(records)
