"""AIR-Bench chat: the LLM judge's prompt, its replies' parsing, resumable judging and the four buckets.

Every answer is judged twice: once with the reference answer as assistant 1 and the model's answer
as assistant 2 (the official order), once swapped, so that a judge's preference for the first (or
second) position cancels out; the model's score for an item is the mean of its two scores.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ORDERS = ("reference_first", "model_first")
BUCKETS = ("speech", "sound", "music", "mixed")
MIXED_PARTS = ("speech_and_sound", "speech_and_music")
JUDGE_FILE = "judge.jsonl"

# Our wording of the AIR-Bench / GPT-4 judging prompt: audio meta-information, question, two answers,
# the four criteria, a 1-10 score each, the two scores alone on the first line, then the reasons.
JUDGE_TEMPLATE = """You are a careful, impartial judge of answers about audio.
[Audio Description]
{meta_info}
[Question]
{question}
[The Start of Assistant 1's Answer]
{answer_1}
[The End of Assistant 1's Answer]
[The Start of Assistant 2's Answer]
{answer_2}
[The End of Assistant 2's Answer]
[System]
Two AI assistants answered the question above about an audio clip; you cannot hear the clip, but its
description above tells you what it contains. Rate each answer for helpfulness, relevance, accuracy
and comprehensiveness, with one overall score from 1 to 10 per assistant (higher is better).
On the first line write only the two scores, Assistant 1's then Assistant 2's, separated by a space.
From the second line on, explain your rating. Judge the content only: neither the order in which
the answers appear nor their length should change your scores."""

_SCORES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[, ]\s*(\d+(?:\.\d+)?)\s*$")


def judge_prompt(record: dict, order: str) -> str:
    reference, answer = record["answer_gt"], record.get("response") or ""
    first, second = (reference, answer) if order == "reference_first" else (answer, reference)
    meta = record.get("meta_info")
    meta = meta if isinstance(meta, str) else json.dumps(meta, ensure_ascii=False)
    return JUDGE_TEMPLATE.format(meta_info=meta, question=record["question"], answer_1=first, answer_2=second)


def parse_scores(reply: str | None) -> tuple[float, float] | None:
    """The two scores on the first non-empty line ('8 6', '8, 6', '7.5 6'); None when absent or not in 0-10."""
    for line in (reply or "").splitlines():
        if line.strip():
            m = _SCORES.match(line)
            if not m:
                return None
            a, b = float(m.group(1)), float(m.group(2))
            return (a, b) if 0 <= a <= 10 and 0 <= b <= 10 else None
    return None


def bucket_of(task_name: str) -> str | None:
    """Chat task names ('speech_dialogue_QA', 'sound_generation_QA', 'speech_and_music_QA', ...) -> bucket."""
    name = task_name.lower()
    for part in MIXED_PARTS:
        if name.startswith(part):
            return part
    for bucket in ("speech", "sound", "music"):
        if name.startswith(bucket):
            return bucket
    return None


# ---- judging -----------------------------------------------------------------------------------
def load_judgments(out_dir: Path) -> dict[tuple[str, str], dict]:
    """(item_key, order) -> stored judgment; a torn last line (a crash while writing) is ignored."""
    done = {}
    path = Path(out_dir) / JUDGE_FILE
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                j = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[(j["item_key"], j["order"])] = j
    return done


def run_judge(records: list[dict], out_dir: Path, client, model: str, *, temperature: float = 0.0,
              max_tokens: int = 1024, concurrency: int = 8, progress: bool = True) -> dict[tuple[str, str], dict]:
    """Judge every answered record in both orders, skipping pairs already in judge.jsonl; returns all judgments."""
    from tqdm import tqdm

    from .runner import append_lines, repair_tail

    out_dir = Path(out_dir)
    done = load_judgments(out_dir)
    todo = [(r, o) for r in records for o in ORDERS if (r["item_key"], o) not in done]
    path = out_dir / JUDGE_FILE
    repair_tail(path)
    lock = threading.Lock()
    bar = tqdm(total=len(records) * 2, initial=len(records) * 2 - len(todo), desc="judging", unit="req",
               disable=not progress)

    def judge_one(pair):
        record, order = pair
        reply = client.complete([{"role": "user", "content": judge_prompt(record, order)}], model=model,
                                temperature=temperature, max_tokens=max_tokens)
        scores = parse_scores(reply)
        j = {"item_key": record["item_key"], "order": order, "task_name": record["task_name"], "reply": reply,
             "scores": list(scores) if scores else None}
        if scores:  # the model's answer is assistant 2 in the official order, assistant 1 when swapped
            j["reference_score"], j["model_score"] = scores if order == "reference_first" else scores[::-1]
        with lock:
            append_lines(path, [j])
            done[(record["item_key"], order)] = j
            bar.update(1)

    pool = ThreadPoolExecutor(max(1, concurrency))
    try:
        for future in [pool.submit(judge_one, pair) for pair in todo]:
            future.result()  # re-raises the first failure; finished judgments are already on disk
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure, send nothing more
        bar.close()
    return done


def chat_scores(records: list[dict], judgments: dict[tuple[str, str], dict]) -> dict:
    """Per-bucket mean scores of the model and of the reference answers; unparsable judgments counted apart."""
    sums = {b: {"model": 0.0, "reference": 0.0, "n": 0} for b in ("speech", "sound", "music") + MIXED_PARTS}
    failed, unjudged, unknown = [], 0, set()
    for r in records:
        pair = [judgments.get((r["item_key"], o)) for o in ORDERS]
        if any(j is None for j in pair):
            unjudged += 1
            continue
        if any(j.get("scores") is None for j in pair):
            failed.append(r["item_key"])
            continue
        bucket = bucket_of(r["task_name"])
        if bucket is None:
            unknown.add(r["task_name"])
            continue
        s = sums[bucket]
        s["model"] += sum(j["model_score"] for j in pair) / 2
        s["reference"] += sum(j["reference_score"] for j in pair) / 2
        s["n"] += 1
    parts = {b: {"model": s["model"] / s["n"], "reference": s["reference"] / s["n"], "n": s["n"]}
             for b, s in sums.items() if s["n"]}
    buckets = {b: parts[b] for b in ("speech", "sound", "music") if b in parts}
    mixed = [parts[p] for p in MIXED_PARTS if p in parts]
    if mixed:  # the paper's 'mixed' is the mean of its two sub-buckets, not of their items
        buckets["mixed"] = {"model": sum(m["model"] for m in mixed) / len(mixed),
                            "reference": sum(m["reference"] for m in mixed) / len(mixed),
                            "n": sum(m["n"] for m in mixed)}
    return {"buckets": buckets, "sub_buckets": {p: parts[p] for p in MIXED_PARTS if p in parts},
            "judged": sum(s["n"] for s in sums.values()), "parse_failures": len(failed),
            "parse_failure_keys": failed, "unjudged": unjudged, "unknown_task_names": sorted(unknown)}
