"""Everything around the model for training: loading, freezing, LoRA, gradient checkpointing,
the optimizer, mixed precision, and writing the final checkpoint directory."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model import Qwen2AudioModel
from ..processor import Qwen2AudioProcessor
from ..weights import shard_files
from . import lora as lora_lib
from .config import TrainConfig, TrainConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def trainable_parts(cfg: TrainConfig) -> list[str]:
    flags = (("audio_tower", cfg.freeze_audio_tower), ("projector", cfg.freeze_projector), ("llm", cfg.freeze_llm))
    return [part for part, frozen in flags if not frozen]


def part_module(model: Qwen2AudioModel, part: str) -> nn.Module:
    return {"audio_tower": model.audio_tower, "projector": model.multi_modal_projector, "llm": model.language_model}[part]


def load_model(cfg: TrainConfig, device: torch.device) -> Qwen2AudioModel:
    return Qwen2AudioModel.from_pretrained(cfg.model, device=device, dtype=DTYPES[cfg.model_dtype])


def prepare_trainable(model: Qwen2AudioModel, cfg: TrainConfig, upcast: bool = True) -> list[str]:
    """Freeze everything, then open the chosen parts (or put LoRA adapters in them). Returns LoRA targets.
    `upcast=False` leaves trainable weights in their dtype (FSDP casts them unit by unit as it shards)."""
    model.requires_grad_(False)
    parts = trainable_parts(cfg)
    targets: list[str] = []
    adapted = (cfg.lora_parts or parts) if cfg.lora else []
    if adapted:
        targets = lora_lib.select_targets(model, adapted, cfg.lora_target_modules)
        lora_lib.apply_lora(model, targets, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    for part in parts:
        if part not in adapted:
            part_module(model, part).requires_grad_(True)
    model.audio_tower.embed_positions.requires_grad_(False)  # Whisper's fixed sinusoids, as in the reference
    for p in model.parameters() if upcast else ():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # optimizer updates in float32 whatever the frozen weights use
    return targets


def enable_gradient_checkpointing(model: Qwen2AudioModel, cfg: TrainConfig) -> int:
    """Recompute each transformer layer's activations in backward instead of storing them.

    Done from outside the model by shadowing each layer's `forward` on the instance, so module
    names and state-dict keys do not change.
    """
    layers = list(model.language_model.model.layers)
    if not cfg.freeze_audio_tower:  # a frozen tower gets no gradient: nothing to save there
        layers += list(model.audio_tower.layers)
    for layer in layers:
        def checkpointed(*args, _forward=layer.forward, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = checkpointed
    return len(layers)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; biases and norm weights (1-D) get no weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    if not groups:
        raise TrainConfigError("no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast when asked (precision=bf16) or, with auto, on a GPU that supports it."""
    use = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if cfg.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainConfigError(f"precision=bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    if not use:
        if cfg.model_dtype != "float32":
            raise TrainConfigError(f"model_dtype={cfg.model_dtype} needs bf16 autocast (precision=bf16)")
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def checkpoint_dtype(directory: str | Path) -> torch.dtype:
    """The floating dtype the input checkpoint stores its weights in."""
    with safe_open(str(shard_files(Path(directory))[0]), framework="pt") as f:
        for key in f.keys():
            dtype = _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32


def export(model: Qwen2AudioModel, cfg: TrainConfig, processor: Qwen2AudioProcessor, say=print) -> Path:
    """Write `output` as an ordinary checkpoint directory (+ `adapter/` in PEFT format with LoRA)."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.lora:
        lora_lib.save_adapter(model, out / "adapter", base_model=cfg.model, dropout=cfg.lora_dropout,
                              layout=cfg.adapter_layout)
        say(f"LoRA adapter (PEFT format) written to {out / 'adapter'}")
        if not cfg.merge_lora:
            return out / "adapter"
        lora_lib.merge_lora(model)
    dtype = export_dtype(cfg)
    model.save_pretrained(out, dtype=dtype)
    write_side_files(cfg, processor, out)
    say(f"model written to {out} ({str(dtype).removeprefix('torch.')})")
    return out


def export_dtype(cfg: TrainConfig) -> torch.dtype:
    return checkpoint_dtype(cfg.model) if cfg.save_dtype == "auto" else DTYPES[cfg.save_dtype]


def write_side_files(cfg: TrainConfig, processor: Qwen2AudioProcessor, out: Path) -> None:
    """Everything of a checkpoint directory besides config.json and the weights."""
    processor.save_pretrained(out)
    generation = Path(cfg.model) / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, out / "generation_config.json")
    else:
        tok = processor.tokenizer
        (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.im_end_id, tok.endoftext_id]}) + "\n")


__all__ = ["autocast", "build_optimizer", "enable_gradient_checkpointing", "export", "load_model", "prepare_trainable",
           "trainable_parts"]
