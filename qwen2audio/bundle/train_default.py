"""The default model's training recipe, resumable across machines (`scripts/train_default_model.sh`).

    1. corpus      `qwen2audio synth` (seeded: the same audio on every machine)
    2. init        the assembled model with an untrained projector (`assemble`)
    3. leg 1       alignment: the corpus's pre-training task records (ASR of questions and of the real
                   Asterisk recordings in five languages, language ids, sound and instrument labels,
                   captions), projector only, LLM and encoder frozen
    4. leg 2       every task record of the corpus, now with the open-vocabulary sentences in five languages
    5. leg 3       the same records in a new order, with the encoder learning too (LoRA on its linear layers)
    6. answers     the frozen LLM's own answers to the training questions and sentences, typed (`answers.py`)
    7. leg 4       the whole mixture (`mixture.py`): every task record, the analysis conversations and
                   behaviour-aligned voice chat
    8. export      the trained projector and encoder LoRA factors -> assets/default_model/trained.safetensors

A run stops whenever the machine goes (a session ends): every `save_every` steps its checkpoint (the
projector, AdamW moments, RNG and data position: a few MB) is what `save-state` copies into the repository
(`training/default_model/LEG/`), and the next machine's run starts from there (`restore_state`). The
paths of the run are part of its identity (the trainer refuses a resume with another model or data),
so WORK must be the same on every machine (default `$HOME/work`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = REPO / "training" / "default_model"
SEED = 0
CORPUS_SIZE = "open=6000,chat=3000,asterisk=all,sound=1200,music=800"
# From leg 3 on, the Whisper encoder learns too, through LoRA (as Qwen2-Audio trains its encoder): the projector
# alone is one linear map per frame, and after 575 steps it still gave fluent text unrelated to the speech.
# The factors (r 16 on every encoder linear: 0.9 M parameters) keep the committed state small.
ENCODER_LORA = ["--lora", "--set", "lora_parts=audio_tower", "--lora-r", "16", "--lora-alpha", "32",
                "--set", "lora_dropout=0"]
LEGS = {
    # name: (items of the corpus whose task records it trains on, train flags)
    "leg1": ("chat=3000,asterisk=all,sound=1200,music=366",
             ["--freeze", "llm", "--set", "precision=fp32", "--lr", "1e-3", "--batch-size", "4", "--max-steps", "2400",
              "--max-length", "320", "--set", "warmup_steps=50", "--set", "audio_cache_gb=3"]),
    "leg2": (CORPUS_SIZE,
             ["--freeze", "llm", "--set", "precision=fp32", "--lr", "5e-4", "--batch-size", "4", "--max-steps", "4000",
              "--max-length", "320", "--set", "warmup_steps=20", "--set", "audio_cache_gb=3"]),
    "leg3": (CORPUS_SIZE, ["--freeze", "llm", "--unfreeze", "audio_tower", *ENCODER_LORA, "--set", "precision=fp32",
                           "--lr", "1e-3", "--batch-size", "4", "--max-steps", "4000", "--max-length", "320",
                           "--set", "warmup_steps=50"]),
    "leg4": (CORPUS_SIZE, ["--freeze", "llm", "--unfreeze", "audio_tower", *ENCODER_LORA, "--set", "precision=fp32",
                           "--lr", "3e-4", "--batch-size", "4", "--max-steps", "4000", "--max-length", "320",
                           "--set", "warmup_steps=20"]),
}
# Leg 1 was stopped at step 450 of its schedule: its task records are one third template questions, and its
# transcripts drifted towards them ("What is the capital of France?"), so leg 2 moves on to the whole corpus with
# the open-vocabulary sentences. Leg 2 was stopped at step 175 (loss about 2.1, transcripts fluent but unrelated to
# the speech): leg 3 goes on with the encoder adapted too. A leg starts from what its previous leg's latest
# checkpoint trained.
PREVIOUS = {"leg2": "leg1", "leg3": "leg2", "leg4": "leg3"}
CURRENT = "leg3"  # the leg `train` continues by default
OPEN_SHARE = 0.5  # of the English open-vocabulary sentences also trained as voice chat
SAVE_EVERY = 25


def _log(message: str) -> None:
    print(f"[default-model] {message}", flush=True)


def _run(cmd: list[str]) -> None:
    _log(" ".join(cmd))
    subprocess.run(cmd, check=True)


def task_records(size: str, seed: int = SEED) -> list[dict]:
    """The pre-training task records (training split, in the corpus's seeded order) of the items a corpus of
    `size` holds: the same records a build of that size writes to pretrain_train.jsonl, computed without
    rendering, so a leg can train on a part of a larger corpus."""
    from ..synth import plan, records

    specs = [s for s in plan.make_plan(plan.parse_size(size, set(plan.SOURCES)), seed, set(plan.SOURCES))
             if s["split"] == "train"]
    task = [r for s in specs for _, r in records.pretrain_records(s)]
    order = np.random.default_rng([seed, 7])  # build.write_outputs: the SFT order is drawn first, then this one
    order.permutation(sum(len(records.sft_records(s)) for s in specs))
    return [task[i] for i in order.permutation(len(task))]


def leg_data(work: Path, leg: str) -> Path:
    """The leg's JSONL in the corpus folder (its audio paths are relative to it), written once."""
    path = work / "corpus1" / f"{leg}.jsonl"
    if path.exists():
        return path
    if leg == "leg4":
        from .answers import answer_texts
        from .mixture import build_mixture, voice_chat_texts

        texts = voice_chat_texts(work / "corpus1", OPEN_SHARE, SEED)
        answers = answer_texts(work / "init-model", texts, work / "answers.jsonl", log=_log)
        out, counts = build_mixture(work / "corpus1", answers, leg, OPEN_SHARE, SEED)
        _log(f"{leg} data: {counts}")
        return out
    rows = task_records(LEGS[leg][0])
    if leg not in ("leg1", "leg2"):  # a later pass over the same records draws its own order
        rows = [rows[i] for i in np.random.default_rng([SEED, int(leg[3:])]).permutation(len(rows))]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def latest_checkpoint(output: Path) -> Path | None:
    steps = sorted((output / "checkpoints").glob("step-*")) if (output / "checkpoints").is_dir() else []
    return steps[-1] if steps else None


def _step(path: Path | None) -> int:
    return int(path.name.split("-")[1]) if path else -1


def restore_state(work: Path, leg: str) -> None:
    """Put the repository's committed checkpoint of `leg` into the run's folder when it is newer."""
    saved = latest_checkpoint(STATE_DIR / leg)
    output = work / "runs" / leg
    if saved is not None and _step(saved) > _step(latest_checkpoint(output)):
        target = output / "checkpoints" / saved.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(saved, target)
        _log(f"restored {leg} from the repository's {saved.name}")


def save_state(work: Path, leg: str) -> Path | None:
    """Copy the run's latest checkpoint into the repository (replacing the previous one) for the next machine."""
    latest = latest_checkpoint(work / "runs" / leg)
    if latest is None:
        return None
    target = STATE_DIR / leg / "checkpoints" / latest.name
    if not target.exists():
        tmp = target.with_name(".tmp-" + latest.name)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(latest, tmp)
        for old in (STATE_DIR / leg / "checkpoints").glob("step-*"):
            shutil.rmtree(old)
        tmp.rename(target)
    return target


def export(work: Path, leg: str, dest: Path) -> Path:
    """The leg's trained projector (latest checkpoint) as the shipped trained.safetensors."""
    from safetensors.torch import load_file, save_file

    latest = latest_checkpoint(work / "runs" / leg)
    if latest is None:
        raise SystemExit(f"{leg} has no checkpoint yet")
    from ..train.checkpoint import read_state

    tensors = {k: v.contiguous() for k, v in load_file(str(latest / "trainable.safetensors")).items()}
    config = read_state(latest)["config"]
    metadata = {"leg": leg, "checkpoint": latest.name}
    if config.get("lora"):  # the factors ship as they are; assembly merges them (assemble.apply_trained)
        metadata["lora_scaling"] = repr(config["lora_alpha"] / config["lora_r"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest), metadata=metadata)
    return dest


def start_model(work: Path, leg: str) -> Path:
    """The model a leg trains: the untrained assembly, or the assembly with the previous leg's projector."""
    from .assemble import assemble

    if leg not in PREVIOUS:
        return assemble(work / "init-model", trained=None)
    previous = work / f"{PREVIOUS[leg]}.safetensors"
    if not previous.exists():
        restore_state(work, PREVIOUS[leg])  # a new machine has only the repository's checkpoint of it
        export(work, PREVIOUS[leg], previous)
    return assemble(work / f"{leg}-start", trained=previous)


def train_leg(work: Path, leg: str, python: str) -> None:
    model = start_model(work, leg)
    data = leg_data(work, leg)
    restore_state(work, leg)
    output = work / "runs" / leg
    cmd = [python, "-m", "qwen2audio", "train", "--stage", "sft", "--model", str(model),
           "--data", str(data), "--output", str(output), *LEGS[leg][1], "--save-every", str(SAVE_EVERY),
           "--keep-last", "2", "--no-progress"]
    if latest_checkpoint(output) is not None:
        cmd += ["--resume"]
    _run(cmd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen2audio.bundle.train_default", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["all", "corpus", "init", "train", "save-state", "export"])
    p.add_argument("--work", type=Path, default=Path.home() / "work")
    p.add_argument("--leg", default=CURRENT, choices=sorted(LEGS))
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    work, python = args.work, sys.executable
    if args.what in ("all", "corpus"):
        _run([python, "-m", "qwen2audio", "synth", "--output", str(work / "corpus1"), "--size", CORPUS_SIZE,
              "--seed", str(SEED), "--jobs", str(args.jobs)])
    if args.what in ("all", "init"):
        from .assemble import assemble

        assemble(work / "init-model", trained=None)
    if args.what in ("all", "train"):
        train_leg(work, args.leg, python)
    if args.what in ("all", "save-state"):
        _log(f"state: {save_state(work, args.leg)}")
    if args.what in ("all", "export"):
        from .assemble import TRAINED_FILE

        _log(f"exported: {export(work, args.leg, TRAINED_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
