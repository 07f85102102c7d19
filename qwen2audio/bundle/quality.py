"""Measuring the bundled model: `qwen2audio eval` on the corpus's held-out sets, and DPO preference accuracy.

Every measurement is saved under the work folder and reused when it is there, so re-running the
recipe does not re-evaluate (each `qwen2audio eval` run itself also resumes item by item).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..synth.evalsets import EVAL_SETS, eval_file
from .recipe import _log

RAW_SETS = tuple(name for name, task in EVAL_SETS.items() if task != "audio-qa")  # base-model prompts


def headline(task: str, metrics: dict) -> dict:
    """One number per eval run, pooled over its sources: WER (errors / reference words) or accuracy."""
    sources = metrics["sources"].values()
    if task == "asr":
        errors, units = sum(s["errors"] for s in sources), sum(s["ref_units"] for s in sources)
        return {"metric": "wer", "value": errors / units if units else None, "n": sum(s["n"] for s in sources)}
    correct, total = sum(s["correct"] for s in sources), sum(s["total"] for s in sources)
    return {"metric": "accuracy", "value": correct / total if total else None, "n": total}


def evaluate_sets(model_dir: str | Path, corpus: str | Path, out_root: str | Path, sets=tuple(EVAL_SETS),
                  batch_size: int = 8, max_new_tokens: int = 64) -> dict:
    """`python -m qwen2audio eval` on each non-empty eval set; name -> {task, headline, per-source metrics}."""
    corpus, out_root = Path(corpus), Path(out_root)
    results = {}
    for name in sets:
        data, task, out = eval_file(corpus, name), EVAL_SETS[name], out_root / name
        if not data.exists() or not data.read_text(encoding="utf-8").strip():
            continue
        if not (out / "summary.json").exists():
            cmd = [sys.executable, "-m", "qwen2audio", "eval", "--task", task, "--data", str(data), "--model",
                   str(model_dir), "--output", str(out), "--batch-size", str(batch_size), "--max-new-tokens",
                   str(max_new_tokens), "--no-progress"]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        metrics = json.loads((out / "summary.json").read_text())["metrics"]
        results[name] = {"task": task, **headline(task, metrics),
                         "sources": {k: {m: v for m, v in s.items() if m in ("n", "wer", "unit", "accuracy")}
                                     for k, s in metrics["sources"].items()}}
        value = results[name]["value"]
        _log(f"eval {Path(model_dir).name} {name}: {results[name]['metric']} "
             f"{'-' if value is None else f'{value:.4f}'} on {results[name]['n']}")
    return results


def preference_accuracy(model_dir: str | Path, pairs_jsonl: str | Path, batch_size: int = 8) -> dict:
    """How often the model gives the chosen answer a higher total log-probability than the rejected one.

    This is the model on its own as a ranker (not DPO's reward accuracy against a reference, which is
    0 for the SFT model by construction), so SFT and DPO models are compared on the same footing."""
    import torch

    from ..api import load
    from ..train.data import Collate, ExampleDataset, eval_batches
    from ..train.objectives import logits_of, sequence_logps, split_pairs
    from ..train.records import load_examples

    if not Path(pairs_jsonl).read_text(encoding="utf-8").strip():  # every held-out record was skipped
        return {"pairs": 0, "accuracy": None, "mean_margin": None}
    pipe = load(model_dir, device="cpu", progress=False)
    processor, model = pipe.processor, pipe.model.eval()
    examples = load_examples(pairs_jsonl, "dpo", processor.tokenizer, 2048, "drop", True,
                             lambda msg: None).examples
    collate = Collate(processor.tokenizer.pad_id, processor.n_mels, split="eval")
    wins = margins = 0.0
    with torch.no_grad():
        for batch in eval_batches(ExampleDataset(examples), collate, batch_size, 0, 1):
            logps = sequence_logps(logits_of(model, batch, torch.device("cpu")), batch["labels"])
            chosen, rejected = split_pairs(logps, batch["n_pairs"])
            wins += float((chosen > rejected).sum())
            margins += float((chosen - rejected).sum())
    n = len(examples)
    return {"pairs": n, "accuracy": wins / n if n else None, "mean_margin": margins / n if n else None}
