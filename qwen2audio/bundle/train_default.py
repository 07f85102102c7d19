"""The default model's training recipe, resumable across machines (`scripts/train_default_model.sh`).

    1. corpus      `qwen2audio synth` (seeded: the same audio on every machine)
    2. init        the assembled model with an untrained projector (`assemble`)
    3. leg 1       alignment: the corpus's pre-training task records (ASR of questions and of the real
                   Asterisk recordings in five languages, language ids, sound and instrument labels,
                   captions), projector only, LLM and encoder frozen
    4. leg 2       every task record of the corpus, now with the open-vocabulary sentences in five languages
    5. leg 3       the same records in a new order, with the encoder learning too (LoRA on its linear layers)
    6. leg 4       the same records again, with LoRA in the LLM's attention as well
    7. answers     the original LLM's own answers to the training questions and sentences, typed (`answers.py`)
    8. leg 5       the whole mixture (`mixture.py`): every task record, the analysis conversations and
                   behaviour-aligned voice chat
    9. leg 6       DPO on pairs built from leg 5's own mistakes (`preference.py`: its answers far from a
                   conversation's are the rejected side), judged by preference accuracy on held-out pairs
   10. export      the trained projector and LoRA factors -> assets/default_model/trained.safetensors

A run stops whenever the machine goes (a session ends): every `save_every` steps its checkpoint (the
projector, LoRA factors, AdamW moments, RNG and data position: up to about 17 MB) is what `save-state` copies
into the repository (`training/default_model/LEG/`), and the next machine's run starts from there
(`restore_state`). A finished leg leaves only its export (`save-state --final`: LEG.safetensors, float16,
holding every earlier leg's training as well, so it replaces the previous leg's). The LLM's
answers for leg 5, hours of generation, travel the same way (answers.jsonl). The
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
import torch

from ..train.checkpoint import OPTIMIZER

REPO = Path(__file__).resolve().parents[2]
STATE_DIR = REPO / "training" / "default_model"
SEED = 0
CORPUS_SIZE = "open=6000,chat=3000,asterisk=all,sound=1200,music=800"
# Leg 3: the Whisper encoder learns too, through LoRA (as Qwen2-Audio trains its encoder): the projector alone is
# one linear map per frame, and after 575 steps it still gave fluent text unrelated to the speech. Whisper's own
# decoder transcribes these (length-proportional) encoder outputs right, so the content is there to be read.
ENCODER_LORA = ["--lora", "--set", "lora_parts=audio_tower", "--lora-r", "16", "--lora-alpha", "32",
                "--set", "lora_dropout=0"]
# Leg 4 on: LoRA in the LLM's attention (q, v) as well. After leg 3's 250 steps the audio lowered the loss of
# template questions (0.1 against 2.7 nats/token with another clip) but hardly of open sentences (3.3 against
# 3.9): a frozen LLM learns to read speech from little data slowly. Rank 8 keeps the state within budget.
ALL_LORA = ["--unfreeze", "audio_tower", "--unfreeze", "llm", "--lora", "--set", "lora_parts=audio_tower,llm",
            "--set", "lora_target_modules=q_proj,v_proj,out_proj,fc1,fc2", "--lora-r", "8", "--lora-alpha", "16",
            "--set", "lora_dropout=0"]
# bf16 autocast where the CPU multiplies bf16 natively (AVX-512/AMX: 1024^3 matmuls about 3x fp32 on the EPYC we
# trained on); on AVX2 it is emulated and several times slower than fp32. Not a resume invariant, so a leg may
# move between machines of both kinds.
PRECISION = ["--set", "precision=" + ("bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32")]
LEGS = {
    # name: (items of the corpus whose task records it trains on, train flags)
    "leg1": ("chat=3000,asterisk=all,sound=1200,music=366",
             ["--freeze", "llm", *PRECISION, "--lr", "1e-3", "--batch-size", "4", "--max-steps", "2400",
              "--max-length", "320", "--set", "warmup_steps=50", "--set", "audio_cache_gb=3"]),
    "leg2": (CORPUS_SIZE,
             ["--freeze", "llm", *PRECISION, "--lr", "5e-4", "--batch-size", "4", "--max-steps", "4000",
              "--max-length", "320", "--set", "warmup_steps=20", "--set", "audio_cache_gb=3"]),
    "leg3": (CORPUS_SIZE, ["--freeze", "llm", "--unfreeze", "audio_tower", *ENCODER_LORA, *PRECISION,
                           "--lr", "1e-3", "--batch-size", "4", "--max-steps", "4000", "--max-length", "320",
                           "--set", "warmup_steps=50"]),
    "leg4": (CORPUS_SIZE, [*ALL_LORA, *PRECISION, "--lr", "5e-4", "--batch-size", "4",
                           "--max-steps", "8000", "--max-length", "320", "--set", "warmup_steps=50"]),
    "leg5": (CORPUS_SIZE, [*ALL_LORA, *PRECISION, "--lr", "3e-4", "--batch-size", "4",
                           "--max-steps", "4000", "--max-length", "320", "--set", "warmup_steps=20"]),
    # DPO on pairs from leg 5's own mistakes (preference.py); the reference is the leg's start (adapters off). One
    # pass over the pairs (about a third of 3,000 answers make one; 2 a step): a DPO step computes both answers
    # under the policy and under the reference; the 177 held-out pairs are evaluated at the end (14 minutes on 2
    # cores). A first run of plain DPO (lr 2e-5 for 100 steps, then 5e-5, stopped at step 400) raised held-out
    # preference accuracy from 5.6 % to 31.1 % but lowered the chosen answers' likelihood with the rejected ones, and
    # its greedy transcripts got worse (real English WER 22.9 -> 24.0, five languages 48.1 -> 68.9, open TTS
    # 66.2 -> 91). This run adds the chosen answer's NLL to each pair's loss (RPO): 17.5 % held-out preference
    # accuracy after all 500 steps, five languages better on the 256 held-out recordings (50.4 -> 48.2 % WER), but
    # English worse (21.3 -> 24.3), so leg 5's step 3,250 stays the shipped model.
    "leg6": (CORPUS_SIZE, [*ALL_LORA, *PRECISION, "--lr", "3e-5", "--batch-size", "2", "--max-steps", "500",
                           "--max-length", "384", "--set", "warmup_steps=20", "--set", "beta=0.1",
                           "--set", "rpo_alpha=1"]),
}
STAGE = {"leg6": "dpo"}  # the trainer's stage of a leg (sft otherwise)
DPO_PAIRS = {"leg6": (("leg5.jsonl", 3000), ("heldout.jsonl", 400))}  # (conversations, how many) -> train, held-out
# Leg 1 was stopped at step 450 of its schedule: its task records are one third template questions, and its
# transcripts drifted towards them ("What is the capital of France?"), so leg 2 moves on to the whole corpus with
# the open-vocabulary sentences. Leg 2 was stopped at step 175 (loss about 2.1, transcripts fluent but unrelated
# to the speech), leg 3 at step 250 (see above), leg 4 at step 625 (its loss flat at about 2.0 from step 270 on;
# leg 5 trains the same task records inside its mixture), and leg 5 at step 3,775 of 4,000 (its learning rate at its
# floor of 3e-5 since about step 3,700, the loss flat at about 0.77 since step 2,500). A leg starts from what its
# previous leg's latest checkpoint trained; a finished leg keeps only that in the repository (`save-state --final`).
PREVIOUS = {"leg2": "leg1", "leg3": "leg2", "leg4": "leg3", "leg5": "leg4", "leg6": "leg5"}
CURRENT = "leg6"  # the leg `train` continues by default
OPEN_SHARE = 0.5  # of the English open-vocabulary sentences also trained as voice chat
SAVE_EVERY = 25
ANSWERS = "answers.jsonl"  # the original LLM's answers to the voice-chat texts (answers.py), a resumable cache


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
    if leg in DPO_PAIRS:  # the model's answers: resumable, so a stopped build continues (and a finished one is kept)
        for saved in pair_files(STATE_DIR / leg, leg):  # a copy that travelled with the training state
            if saved.exists() and not (work / "corpus1" / saved.name).exists():
                shutil.copy2(saved, work / "corpus1" / saved.name)
        for (source, limit), target in zip(DPO_PAIRS[leg], (path, heldout_pairs(work, leg))):
            if not (work / "corpus1" / source).exists() and Path(source).stem in LEGS:
                leg_data(work, Path(source).stem)  # a new machine: the earlier leg's data, from its saved answers
            _run([sys.executable, "-m", "qwen2audio.bundle.preference", "pairs", "--model", str(work / f"{leg}-start"),
                  "--data", str(work / "corpus1" / source), "--out", str(target), "--limit", str(limit),
                  "--seed", str(SEED), "--no-progress"])
        return path
    if path.exists():
        return path
    if leg == "leg5":
        from .answers import answer_texts
        from .mixture import build_mixture, voice_chat_texts

        texts = voice_chat_texts(work / "corpus1", OPEN_SHARE, SEED)
        cache = work / ANSWERS
        if not cache.exists() and (STATE_DIR / ANSWERS).exists():  # hours of generation: kept with the state
            shutil.copy2(STATE_DIR / ANSWERS, cache)
        answers = answer_texts(work / "init-model", texts, cache, log=_log)
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


def heldout_pairs(work: Path, leg: str) -> Path:
    """A DPO leg's pairs from held-out conversations: its --eval-data, and where preference accuracy is measured."""
    return work / "corpus1" / f"{leg}_heldout.jsonl"


def pair_files(folder: Path, leg: str) -> list[Path]:
    """A DPO leg's pair files and their progress counts in `folder` (hours of generation: they travel with the
    state, so the next machine trains on the same pairs)."""
    names = [f"{leg}.jsonl", f"{leg}_heldout.jsonl"] if leg in DPO_PAIRS else []
    return [folder / n for name in names for n in (name, name + ".progress")]


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
        tmp = target.with_name(".tmp-" + saved.name)  # the trainer never reads .tmp-* folders
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(saved, tmp)
        _cast_moments(tmp / OPTIMIZER, torch.float32)
        tmp.rename(target)
        _log(f"restored {leg} from the repository's {saved.name}")


# The repository's copy of a checkpoint keeps AdamW's moments in bfloat16: in float32 they are 11 of the 25 MB the
# repository allows for trained state. bfloat16 keeps float32's exponent range, so only the moments' third
# significant digit changes; a resume from the repository is close, not bit-exact (a leg that moves between CPU
# kinds is not bit-exact anyway). The weights stay float32: a late step's update is below bfloat16's resolution.
MOMENTS = ("::exp_avg", "::exp_avg_sq")


def _cast_moments(path: Path, dtype: torch.dtype) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v.to(dtype) if k.endswith(MOMENTS) else v for k, v in tensors.items()}, str(path), metadata=metadata)


def save_state(work: Path, leg: str, final: bool = False) -> Path | None:
    """Copy the run's latest checkpoint into the repository (replacing the previous one) for the next machine.
    `final`: the leg is finished; keep only its export (everything trained so far, what the next leg starts
    from) as training/default_model/LEG.safetensors, in place of its checkpoint."""
    if (work / ANSWERS).exists():
        shutil.copy2(work / ANSWERS, STATE_DIR / ANSWERS)
    for built in pair_files(work / "corpus1", leg):
        if built.exists():
            (STATE_DIR / leg).mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, STATE_DIR / leg / built.name)
    latest = latest_checkpoint(work / "runs" / leg)
    if latest is None:
        return None
    if final:
        target = export(work, leg, STATE_DIR / f"{leg}.safetensors")
        shutil.rmtree(STATE_DIR / leg, ignore_errors=True)
        if leg in PREVIOUS:  # the export holds every earlier leg's training too
            (STATE_DIR / f"{PREVIOUS[leg]}.safetensors").unlink(missing_ok=True)
        return target
    target = STATE_DIR / leg / "checkpoints" / latest.name
    if not target.exists():
        tmp = target.with_name(".tmp-" + latest.name)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(latest, tmp)
        _cast_moments(tmp / OPTIMIZER, torch.bfloat16)
        for old in (STATE_DIR / leg / "checkpoints").glob("step-*"):
            shutil.rmtree(old)
        tmp.rename(target)
    return target


def exported(work: Path, leg: str) -> Path:
    """work/LEG.safetensors: everything trained up to `leg`, from the repository's copy of a finished leg, or
    exported from its checkpoint (restored from the repository on a new machine)."""
    path = work / f"{leg}.safetensors"
    if not path.exists():
        if (STATE_DIR / path.name).exists():
            shutil.copy2(STATE_DIR / path.name, path)
        else:
            restore_state(work, leg)
            export(work, leg, path)
    return path


def _read_trained(path: Path) -> tuple[dict, float]:
    """Tensors of an exported file and its LoRA scaling (1.0 when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys()}, float((f.metadata() or {}).get("lora_scaling", "1.0"))


def stack_trained(earlier: dict, earlier_scaling: float, later: dict, later_scaling: float) -> dict:
    """One set of trained tensors with LoRA scaling 1 holding two legs' training: the later leg's plain tensors
    replace the earlier's (it trained on from them), and LoRA pairs on the same layer stack along the rank,
    B = [B1 s1, B2 s2], A = [A1; A2], so that B @ A = B1 A1 s1 + B2 A2 s2 (the later leg adapted the earlier's
    merged layer)."""
    out = {k: v for k, v in earlier.items() if ".lora_" not in k}
    out.update({k: v for k, v in later.items() if ".lora_" not in k})
    for tensors, scaling in ((earlier, earlier_scaling), (later, later_scaling)):
        for name, a in tensors.items():
            if not name.endswith(".lora_A.weight"):
                continue
            b_name = name.replace(".lora_A.", ".lora_B.")
            b = tensors[b_name] * scaling
            out[name] = torch.cat([out[name], a]) if name in out else a
            out[b_name] = torch.cat([out[b_name], b], dim=1) if b_name in out else b
    return {k: v.contiguous() for k, v in out.items()}


def export(work: Path, leg: str, dest: Path) -> Path:
    """Everything trained up to `leg` (its latest checkpoint on top of the earlier legs' exports) as one
    trained.safetensors that assembly applies to the untrained parts."""
    from safetensors.torch import load_file, save_file

    from ..train.checkpoint import read_state

    latest = latest_checkpoint(work / "runs" / leg)
    if latest is None:
        raise SystemExit(f"{leg} has no checkpoint yet")
    tensors = load_file(str(latest / "trainable.safetensors"))
    config = read_state(latest)["config"]
    scaling = config["lora_alpha"] / config["lora_r"] if config.get("lora") else 1.0
    if leg in PREVIOUS:
        tensors = stack_trained(*_read_trained(exported(work, PREVIOUS[leg])), tensors, scaling)
    else:
        tensors = stack_trained({}, 1.0, tensors, scaling)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # float16, the assembled model's own dtype: half the bytes in the repository, and the same merged weights to
    # within float16 rounding. assemble.apply_trained merges each LoRA pair into its layer with this scaling.
    tensors = {k: v.to(torch.float16) for k, v in tensors.items()}
    save_file(tensors, str(dest), metadata={"leg": leg, "checkpoint": latest.name, "lora_scaling": "1.0"})
    return dest


def start_model(work: Path, leg: str) -> Path:
    """The model a leg trains: the untrained assembly, or the assembly with everything the earlier legs trained."""
    from .assemble import assemble

    if leg not in PREVIOUS:
        return assemble(work / "init-model", trained=None)
    return assemble(work / f"{leg}-start", trained=exported(work, PREVIOUS[leg]))


def train_leg(work: Path, leg: str, python: str) -> None:
    model = start_model(work, leg)
    data = leg_data(work, leg)
    restore_state(work, leg)
    output = work / "runs" / leg
    cmd = [python, "-m", "qwen2audio", "train", "--stage", STAGE.get(leg, "sft"), "--model", str(model),
           "--data", str(data), "--output", str(output), *LEGS[leg][1], "--save-every", str(SAVE_EVERY),
           "--keep-last", "2", "--no-progress"]
    if leg in DPO_PAIRS:
        cmd += ["--eval-data", str(heldout_pairs(work, leg))]
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
    p.add_argument("--final", action="store_true",
                   help="save-state: the leg is finished; keep only its export (what the next leg starts from)")
    args = p.parse_args(argv)
    work, python = args.work, sys.executable
    # `train` on a new machine first rebuilds the seeded corpus (about 26 minutes on 2 cores)
    if args.what in ("all", "corpus") or (args.what == "train" and not (work / "corpus1" / "manifest.json").exists()):
        _run([python, "-m", "qwen2audio", "synth", "--output", str(work / "corpus1"), "--size", CORPUS_SIZE,
              "--seed", str(SEED), "--jobs", str(args.jobs)])
    if args.what in ("all", "init"):
        from .assemble import assemble

        assemble(work / "init-model", trained=None)
    if args.what in ("all", "train"):
        train_leg(work, args.leg, python)
    if args.what in ("all", "save-state"):
        _log(f"state: {save_state(work, args.leg, args.final)}")
    if args.what in ("all", "export"):
        from .assemble import TRAINED_FILE

        _log(f"exported: {export(work, args.leg, TRAINED_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
