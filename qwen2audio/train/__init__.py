"""Training for Qwen2-Audio: pre-training task prompts, SFT, DPO; full or LoRA; one process or torchrun.

    from qwen2audio.train import TrainConfig, train
    train(TrainConfig(stage="sft", model="ckpt", data="train.jsonl", output="out", lora=True))

Names load lazily, so `qwen2audio --help` does not import the trainer.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "config", "TrainConfigError": "config",
    "train": "loop", "TrainResult": "loop", "export_checkpoint": "loop",
    "DataError": "records", "load_examples": "records",
    "make_example": "pretrain_tasks", "examples_from_pairs": "pretrain_tasks", "task_record": "pretrain_tasks",
    "task_records_from_pairs": "pretrain_tasks",
    "write_task_jsonl": "pretrain_tasks",
    "LoRALinear": "lora", "apply_lora": "lora", "merge_lora": "lora", "save_adapter": "lora", "load_adapter": "lora",
    "dpo_loss": "objectives",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
