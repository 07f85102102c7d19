"""The language model's own answers to typed texts: the voice-chat targets of behaviour alignment.

A spoken question is trained towards what the frozen LLM answers when the same words are typed (as
BLSP and DiVA do), so whatever the LLM knows in text it learns to answer by voice, for any question,
instead of a fixed table of answers. Answers are greedy, written to a JSONL cache one batch at a time
(text -> answer), so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

MAX_NEW_TOKENS = 64


def _trim(answer: str, hit_limit: bool) -> str | None:
    """A finished answer as it is; one cut by the token limit back to its last full sentence (None if
    that leaves nothing): a target that stops mid-word teaches the model to stop mid-word."""
    answer = answer.strip()
    if not hit_limit:
        return answer or None
    ends = [m.end() for m in re.finditer(r"[.!?](\s|$)", answer)]
    return answer[:ends[-1]].strip() if ends else None


def read_answers(path: str | Path) -> dict[str, str | None]:
    path = Path(path)
    out: dict[str, str | None] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write: its batch is answered again
            out[row["text"]] = row["answer"]
    return out


def answer_texts(model_dir: str | Path, texts: list[str], cache: str | Path, batch_size: int = 32,
                 max_new_tokens: int = MAX_NEW_TOKENS, log=print) -> dict[str, str | None]:
    """text -> the model's greedy chat answer (None where it gave no usable answer), for every text.
    Batches of typed questions are compute-bound: where the CPU multiplies bfloat16 natively (AVX-512, AMX:
    about 3x float32) the model runs in bfloat16, elsewhere in float32."""
    import torch

    from ..api import load

    cache = Path(cache)
    done = read_answers(cache)
    todo = sorted({t for t in texts if t not in done}, key=len)  # similar lengths batch with less padding
    if todo:
        dtype = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
        pipe = load(model_dir, progress=False, dtype=dtype)
        started = time.time()
        with cache.open("a", encoding="utf-8") as f:
            for i in range(0, len(todo), batch_size):
                chunk = todo[i:i + batch_size]
                conversations = [[{"role": "user", "content": text}] for text in chunk]
                for text, answer in zip(chunk, pipe.chat_batch(conversations, max_new_tokens=max_new_tokens)):
                    hit_limit = len(pipe.tokenizer.encode(answer)) >= max_new_tokens - 1
                    done[text] = _trim(answer, hit_limit)
                    f.write(json.dumps({"text": text, "answer": done[text]}, ensure_ascii=False) + "\n")
                f.flush()
                n = i + len(chunk)
                log(f"answers: {n}/{len(todo)} ({(time.time() - started) / n:.2f} s each)")
    return {t: done[t] for t in texts}
