"""DPO pairs from the default model's own mistakes, and the preference accuracy that judges a DPO leg.

    python -m qwen2audio.bundle.preference pairs --model DIR --data CORPUS/leg5.jsonl --limit 3000 --out PAIRS.jsonl
    python -m qwen2audio.bundle.preference accuracy --model DIR --pairs PAIRS.jsonl

pairs: the model answers the user turn of each one-turn, one-clip conversation of a JSONL file (audio analysis,
"<audio>What's that sound?", and voice chat, the clip alone), greedily. Where its answer is far from the record's
(word error rate against it, over normalised words, above --threshold), the record becomes a DPO record: the
record's answer is chosen, the model's rejected. Task records (raw prompts) are left out. The output grows batch
by batch next to a count of the records already answered (and of the output's bytes then), so a stopped run
continues where it was, without repeating the pairs of a batch whose count it had not saved.

accuracy: the share of pairs whose chosen answer the model finds more likely than the rejected one (summed
log-probabilities of the answer tokens, the quantity DPO compares). Measured on held-out pairs before and after
a DPO leg, it says whether the leg moved the model towards the right answers beyond what it was trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

from ..errors import Qwen2AudioError

THRESHOLD = 0.3  # word error rate of the model's answer against the record's above which they make a pair


class PreferenceError(Qwen2AudioError):
    pass


def conversations(path: Path) -> list[dict]:
    """The one-turn conversations with one clip of a JSONL file (the others are skipped)."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line) if line.strip() else {}
        messages = record.get("messages") or []
        if (len(messages) == 2 and [m.get("role") for m in messages] == ["user", "assistant"]
                and len(record.get("audios") or []) == 1 and isinstance(messages[0].get("content"), str)
                and messages[0]["content"].count("<audio>") == 1):
            out.append(record)
    return out


def answer_distance(reference: str, answer: str) -> float:
    """Word error rate of `answer` against `reference`, over Whisper-normalised words: its English normaliser
    for ASCII references ("Six times ten" equals "6 times 10"), the basic one for any other language."""
    from ..eval.metrics import asr_tokens, edit_distance

    language = "en" if reference.isascii() else "xx"
    ref, hyp = asr_tokens(reference, language), asr_tokens(answer, language)
    return edit_distance(ref, hyp) / max(len(ref), 1)


def pair_of(record: dict, answer: str, threshold: float = THRESHOLD) -> dict | None:
    """The DPO record of a conversation and the model's answer to it, or None when the answer is close enough."""
    chosen = record["messages"][1]["content"]
    if not answer.strip() or answer_distance(chosen, answer) <= threshold:
        return None
    return {**record, "rejected_response": answer.strip()}


def build_pairs(pipe, data: Path, out: Path, limit: int | None = None, seed: int = 0, threshold: float = THRESHOLD,
                batch_size: int = 16, max_new_tokens: int = 96, progress: bool = True) -> dict:
    """Write `out` (DPO records, audio paths as in `data`, so keep it in the same folder); resumable."""
    from tqdm import tqdm

    from ..audio import load_audio
    from ..engine.sampling import SamplingParams

    records = conversations(data)
    if not records:
        raise PreferenceError(f"{data}: no one-turn conversations with one clip")
    random.Random(seed).shuffle(records)
    records = records[:limit] if limit else records
    state = out.with_name(out.name + ".progress")
    progress = json.loads(state.read_text()) if state.exists() and out.exists() else {}
    done = progress.get("answered", 0)
    if not done:
        out.write_text("", encoding="utf-8")
    elif "bytes" in progress and out.stat().st_size > progress["bytes"]:
        with out.open("r+b") as f:  # pairs of a batch written before a stop that left its count unsaved
            f.truncate(progress["bytes"])
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    with tqdm(total=len(records), initial=done, desc="answering", unit="record", disable=not progress) as bar:
        for start in range(done, len(records), batch_size):
            batch = records[start:start + batch_size]
            wavs = [load_audio(str(data.parent / r["audios"][0])) for r in batch]
            prompts = [r["messages"][0]["content"].replace("<audio>", "").strip() for r in batch]
            answers = pipe.chat_batch([[{"role": "user", "content": [{"type": "audio", "audio": w}]
                                         + ([{"type": "text", "text": p}] if p else [])}]
                                       for p, w in zip(prompts, wavs)], sampling)
            pairs = [p for p in (pair_of(r, a, threshold) for r, a in zip(batch, answers)) if p is not None]
            with out.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
            tmp = state.with_name(state.name + ".tmp")
            tmp.write_text(json.dumps({"answered": start + len(batch), "bytes": out.stat().st_size}))
            os.replace(tmp, state)
            bar.update(len(batch))
    n_pairs = sum(1 for line in out.read_text(encoding="utf-8").splitlines() if line.strip())
    return {"answered": len(records), "pairs": n_pairs}


def preference_accuracy(pipe, pairs: Path, batch_size: int = 4, max_length: int = 512) -> dict:
    """Share of pairs whose chosen answer has the higher summed log-probability under `pipe`'s model."""
    import torch
    import torch.nn.functional as F

    from ..train.data import Collate, ExampleDataset
    from ..train.objectives import logits_of, split_pairs, target_positions
    from ..train.records import load_examples

    examples = load_examples(pairs, "dpo", pipe.tokenizer, max_length, log=None).examples
    if not examples:
        raise PreferenceError(f"{pairs}: no pairs")
    dataset, collate = ExampleDataset(examples), Collate(pipe.tokenizer.pad_id, pipe.processor.n_mels)
    model, device = pipe.model.eval(), pipe.model.device
    wins, margins = 0, []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            predicts, targets = target_positions(batch["labels"].to(device))
            # logits only where a target token is predicted (full (rows, T, vocabulary) logits would be GBs)
            logp = -F.cross_entropy(logits_of(model, batch, device, predicts).float(), targets, reduction="none")
            rows = predicts.nonzero()[:, 0]  # the row of each predicted position, in the mask's (row-major) order
            sums = torch.zeros(predicts.shape[0], device=device).index_add_(0, rows, logp)
            chosen, rejected = split_pairs(sums, batch["n_pairs"])
            wins += int((chosen > rejected).sum())
            margins += (chosen - rejected).tolist()
    return {"pairs": len(margins), "accuracy": wins / len(margins), "mean_margin": sum(margins) / len(margins)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2audio.bundle.preference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    pp = sub.add_parser("pairs", help="DPO pairs from the model's own answers to a JSONL file's conversations")
    pp.add_argument("--data", type=Path, required=True, help="JSONL of conversations (e.g. CORPUS/leg5.jsonl)")
    pp.add_argument("--out", type=Path, required=True, help="DPO JSONL to write (in the same folder as --data)")
    pp.add_argument("--limit", type=int, default=None, help="answer at most N conversations (a seeded choice)")
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--threshold", type=float, default=THRESHOLD,
                    help=f"word error rate against the record's answer above which a pair is made (default {THRESHOLD})")
    pp.add_argument("--max-new-tokens", type=int, default=96)
    pa = sub.add_parser("accuracy", help="share of pairs whose chosen answer the model prefers")
    pa.add_argument("--pairs", type=Path, required=True)
    for q in (pp, pa):
        q.add_argument("--model", default=None, help="checkpoint directory (default: the default model)")
        q.add_argument("--batch-size", type=int, default=None)
        q.add_argument("--dtype", default="float32")
        q.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        source = args.data if args.what == "pairs" else args.pairs
        if not source.is_file():
            raise PreferenceError(f"{source}: no such file")
        from .. import api

        pipe = api.load(args.model, device="cpu", dtype=args.dtype, progress=not args.no_progress)
        if args.what == "pairs":
            result = build_pairs(pipe, args.data, args.out, args.limit, args.seed, args.threshold,
                                 args.batch_size or 16, args.max_new_tokens, not args.no_progress)
        else:
            result = preference_accuracy(pipe, args.pairs, args.batch_size or 4)
    except (Qwen2AudioError, OSError) as e:
        print(f"{p.prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
