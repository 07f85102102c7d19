"""`qwen2audio train`: pre-training, SFT and DPO from the command line (alone or under torchrun).

Only argparse is imported here; torch and the trainer load inside the handler, so `--help` is fast.
"""

from __future__ import annotations

import argparse

from .config import DTYPES  # config.py needs only the standard library

DESCRIPTION = """\
Train a Qwen2-Audio checkpoint: --stage pretrain (task records -> raw task prompts), sft (chat
conversations) or dpo (conversations + "rejected_response"). Settings come from the defaults, then
--config FILE.toml, then the flags below, then --set KEY=VALUE (applied last); the resolved config
is printed at start and saved as OUTPUT/train_config.toml. The same command runs data-parallel
under `torchrun --nproc_per_node N -m qwen2audio train ...` (gloo on CPU, NCCL on GPUs), replicated
(DistributedDataParallel) or, with --fsdp, sharded (FSDP2; also across nodes with torchrun's --nnodes)."""

EPILOG = """\
data (JSONL, one record per line; audio paths relative to the file's folder):
  sft       {"messages": [{"role": "user", "content": "<audio>What's that sound?"},
                          {"role": "assistant", "content": "A dog barking."}], "audios": ["dog.wav"]}
            (or structured parts: {"type": "audio", "audio": "dog.wav"}, {"type": "text", "text": ...})
  dpo       the sft shape + "rejected_response": "A cat."
  pretrain  {"task": "asr", "audio": "a.wav", "label": "hello", "language": "en"}
            tasks: asr, caption, emotion, vocal_sound, translation (source_language, target_language),
            custom (prompt); sft data may mix such task records in (replay of pre-training tasks)

output: OUTPUT is an ordinary checkpoint directory (qwen2audio.load / transformers can open it),
plus OUTPUT/adapter (PEFT LoRA adapter, with --lora), OUTPUT/checkpoints/step-N (for --resume) and
OUTPUT/metrics.jsonl. Every config key can be set with --set; see qwen2audio/train/config.py."""

# Flags whose dest is a config key.
FLAG_KEYS = ("stage", "model", "data", "output", "eval_data", "eval_every", "max_steps", "epochs", "lr", "batch_size",
             "grad_accum", "max_length", "save_every", "keep_last", "device", "seed", "resume", "skip_bad_records",
             "lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "precision",
             "gradient_checkpointing", "progress", "fsdp", "fsdp_cpu_offload")
PARTS = ("audio_tower", "projector", "llm")


def register(subparsers) -> dict:
    p = subparsers.add_parser("train", help="fine-tune a model: pretrain, sft or dpo (full or LoRA)",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    S = argparse.SUPPRESS  # unset flags stay absent, so they never override the config file
    p.add_argument("--config", metavar="FILE.toml", default=None, help="TOML file with config keys (flat, or [lora] r = 8)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any config key, e.g. --set lora_r=16 --set lora_target_modules=q_proj,v_proj (repeatable)")
    p.add_argument("--stage", choices=["pretrain", "sft", "dpo"], default=S, help="training stage (default: sft)")
    p.add_argument("--model", metavar="DIR", default=S, help="checkpoint directory to start from")
    p.add_argument("--data", metavar="FILE.jsonl", default=S, help="training data")
    p.add_argument("--output", metavar="DIR", default=S, help="where the trained model, checkpoints and metrics go")
    p.add_argument("--eval-data", metavar="FILE.jsonl", default=S, help="held-out data for evaluation")
    p.add_argument("--eval-every", type=int, metavar="N", default=S, help="evaluate every N steps (and at the end)")
    p.add_argument("--skip-bad-records", action="store_const", const=True, default=S,
                   help="skip invalid records (each is reported as file:line: reason) instead of failing")
    p.add_argument("--max-steps", type=int, metavar="N", default=S, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=int, metavar="N", default=S, help="passes over the data (default: 1)")
    p.add_argument("--lr", type=float, metavar="LR", default=S, help="peak learning rate (default: 1e-5)")
    p.add_argument("--batch-size", type=int, metavar="N", default=S,
                   help="sequences (DPO: pairs) per micro-batch per process")
    p.add_argument("--grad-accum", type=int, metavar="N", default=S, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, metavar="N", default=S, help="max tokens per sequence, audio included")
    p.add_argument("--freeze", action="append", choices=PARTS, default=S, metavar="PART",
                   help=f"do not train PART ({', '.join(PARTS)}; repeatable); default: only audio_tower is frozen")
    p.add_argument("--unfreeze", action="append", choices=PARTS, default=S, metavar="PART",
                   help="train PART (repeatable)")
    p.add_argument("--lora", action="store_const", const=True, default=S,
                   help="train LoRA adapters (on the unfrozen parts) instead of full weights")
    p.add_argument("--lora-r", type=int, metavar="R", default=S, help="LoRA rank (default: 8)")
    p.add_argument("--lora-alpha", type=float, metavar="A", default=S, help="LoRA alpha; scale = alpha / r (default: 16)")
    p.add_argument("--lora-dropout", type=float, metavar="P", default=S, help="dropout on the LoRA input (default: 0.05)")
    p.add_argument("--lora-target-modules", metavar="NAMES", default=S,
                   help="comma-separated linear layer names (q_proj,v_proj,...) or all-linear (default)")
    p.add_argument("--bf16", action="store_const", dest="precision", const="bf16", default=S,
                   help="bf16 autocast (default: on for GPUs that support it)")
    p.add_argument("--gradient-checkpointing", action="store_const", const=True, default=S,
                   help="recompute layer activations in backward (less memory, more compute)")
    p.add_argument("--fsdp", action="store_const", const=True, default=S,
                   help="shard weights, gradients and optimizer state over the torchrun ranks (FSDP2) and write "
                        "sharded checkpoints; for models whose full fine-tuning does not fit one device")
    p.add_argument("--fsdp-cpu-offload", action="store_const", const=True, default=S,
                   help="with --fsdp: keep the shards and the optimizer step in CPU memory")
    p.add_argument("--save-every", type=int, metavar="N", default=S, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep-last", type=int, metavar="K", default=S, help="checkpoints to keep (default: 2)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT", default=S,
                   help="continue from OUTPUT/checkpoints' latest checkpoint, or from CHECKPOINT")
    p.add_argument("--device", metavar="DEVICE", default=S, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--seed", type=int, metavar="N", default=S, help="seed for data order and init (default: 42)")
    p.add_argument("--no-progress", action="store_const", dest="progress", const=False, default=S,
                   help="print one line per step instead of a progress bar")
    e = subparsers.add_parser(
        "export-checkpoint", help="write a training checkpoint (OUTPUT/checkpoints/step-N) as a model directory",
        description="Write one of a training run's step checkpoints as an ordinary checkpoint directory that "
                    "ask, eval, serve and transformers open: the run's base model with the step's trained "
                    "weights (LoRA merged, and the adapter written, as the run was set up). Use it to evaluate "
                    "a run before it ends, or an earlier step than the last.")
    e.add_argument("checkpoint", metavar="STEP_DIR", help="a step directory, e.g. out/checkpoints/step-00003000")
    e.add_argument("--output", metavar="DIR", required=True, help="where to write the model (must not hold one)")
    e.add_argument("--save-dtype", choices=("auto",) + DTYPES, default=None,
                   help="dtype of the written weights (default: the run's save_dtype; auto = the base model's)")
    return {"train": cmd_train, "export-checkpoint": cmd_export_checkpoint}


def config_from_args(args):
    from .config import TrainConfig, TrainConfigError

    values = {k: getattr(args, k) for k in FLAG_KEYS if hasattr(args, k)}
    both = set(getattr(args, "freeze", [])) & set(getattr(args, "unfreeze", []))
    if both:
        raise TrainConfigError(f"--freeze and --unfreeze both name {', '.join(sorted(both))}")
    for flag, frozen in (("freeze", True), ("unfreeze", False)):
        for part in getattr(args, flag, []):
            values[f"freeze_{part}"] = frozen
    return TrainConfig.from_sources(args.config, values, args.set)


def cmd_train(args) -> int:
    cfg = config_from_args(args).validate()
    from .loop import train

    train(cfg)
    return 0


def cmd_export_checkpoint(args) -> int:
    from .loop import export_checkpoint

    export_checkpoint(args.checkpoint, args.output, args.save_dtype)
    return 0
