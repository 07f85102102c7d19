"""How much memory a training run needs per device: one formula for the README's plan and the trainer's warning.

Per device, with N ranks sharding (FSDP; N = 1 for one device or replicated DDP):

    weights      (4 x trainable + f x frozen-sharded) / N  + f x frozen tower (kept whole)
    grads        4 x trainable / N                          (float32, sharded after the reduce-scatter)
    optimizer    8 x trainable / N                          (AdamW's two float32 moments)
    gathered     2 x c x largest unit + (c + 4) x largest unit   (a unit gathered, the next prefetched,
                                                             one unit's unsharded gradient + its fp32 copy)
    activations  tokens x (L x c x h + a)  with per-layer checkpointing (each layer's input kept, one layer's
                 tensors recomputed), else tokens x L x a;   a = c x (5h + 2 kv + 4 I) + 8h per token and layer
    logits       tokens x V x (2c + 8)                       (logits + their gradient, the float32 copy the loss
                                                             takes and its log-softmax)

f: bytes of a frozen weight (model_dtype), c: of a compute value (2 for bf16), h: hidden size, I: MLP width,
kv: key/value width, L: decoder layers, V: vocabulary, tokens = micro-batch x sequence length. With CPU
offload the first three rows live in host memory. A fixed 1 GiB stands for the CUDA context and allocator
slack on a GPU. `python -m qwen2audio.train.memory` prints the README's table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GIB = 2**30
GPU_OVERHEAD = 1 * GIB
ROWS = ("weights", "grads", "optimizer", "gathered", "activations", "logits")


@dataclass
class Shape:
    """Parameter counts of a (prepared: frozen parts, LoRA) model, and the sizes activations depend on."""

    trainable: int
    frozen_sharded: int  # frozen weights inside sharded units (the LLM's base weights under LoRA)
    frozen_whole: int  # the frozen audio tower, kept whole on every rank
    largest_unit: int  # parameters of the biggest FSDP unit (a decoder layer, or embed_tokens / lm_head)
    largest_trainable_unit: int  # trainable parameters of the unit with the most (its unsharded gradient)
    layers: int
    hidden: int
    intermediate: int
    kv: int
    vocab: int

    @classmethod
    def of(cls, model: nn.Module) -> "Shape":
        def count(module, trainable=None):
            return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)

        tower = model.audio_tower
        tower_frozen = count(tower, True) == 0
        lm = model.language_model
        tc = lm.model.cfg
        trainable = count(model, True)
        frozen = count(model, False)
        whole = count(tower) if tower_frozen else 0
        units = list(lm.model.layers) + [lm.model.embed_tokens, lm.lm_head]
        return cls(trainable, frozen - whole, whole, max(count(u) for u in units), max(count(u, True) for u in units),
                   tc.num_hidden_layers, tc.hidden_size,
                   tc.intermediate_size, tc.num_key_value_heads * tc.head_dim, tc.vocab_size)


def plan(shape: Shape, shards: int, tokens: int, bf16: bool = True, frozen_bytes: int = 2, checkpointing: bool = True,
         offload: bool = False) -> dict[str, int]:
    """Bytes per device, by row (see the module docstring), plus `device` (what the device must hold)."""
    c = 2 if bf16 else 4
    h, L = shape.hidden, shape.layers
    per_layer = c * (5 * h + 2 * shape.kv + 4 * shape.intermediate) + 8 * h
    rows = {
        "weights": (4 * shape.trainable + frozen_bytes * shape.frozen_sharded) // shards + frozen_bytes * shape.frozen_whole,
        "grads": 4 * shape.trainable // shards,
        "optimizer": 8 * shape.trainable // shards,
        "gathered": 2 * c * shape.largest_unit + (c + 4) * shape.largest_trainable_unit,
        "activations": tokens * (L * c * h + per_layer) if checkpointing else tokens * L * per_layer,
        "logits": tokens * shape.vocab * (2 * c + 8),
    }
    host = 0
    if offload:
        host = rows["grads"] + rows["optimizer"] + rows["weights"] - frozen_bytes * shape.frozen_whole
        rows["weights"] = frozen_bytes * shape.frozen_whole
        rows["grads"] = rows["optimizer"] = 0
    rows["device"] = sum(rows[r] for r in ROWS)
    rows["host"] = host
    return rows


def sharded_state(shape: Shape, shards: int, frozen_bytes: int) -> int:
    """What `plan` says the sharded state (weights, grads, optimizer) takes: the part that falls as 1/N."""
    return (16 * shape.trainable + frozen_bytes * shape.frozen_sharded) // shards


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def fits(rows: dict[str, int], device: torch.device) -> tuple[bool, int]:
    """(fits, the device's memory) on a GPU; always fits elsewhere (host memory is not planned here)."""
    if device.type != "cuda":
        return True, 0
    total = torch.cuda.get_device_properties(device).total_memory
    return rows["device"] + GPU_OVERHEAD <= total, total


def describe(rows: dict[str, int]) -> str:
    scale, unit = (GIB, "GiB") if rows["device"] >= GIB else (2**20, "MiB")
    parts = ", ".join(f"{r} {rows[r] / scale:.1f}" for r in ROWS)
    host = f"; host {rows['host'] / scale:.1f} {unit}" if rows.get("host") else ""
    return f"{rows['device'] / scale:.1f} {unit} per device ({parts}){host}"


# ---- the README's table ------------------------------------------------------------------------
def seven_b(lora: bool, r: int = 8) -> nn.Module:
    """Qwen2-Audio-7B's shape on the meta device (no memory), prepared as the trainer would (tower frozen)."""
    from ..config import Qwen2AudioConfig
    from ..model import Qwen2AudioModel
    from . import lora as lora_lib
    from .config import ALL_LINEAR

    with torch.device("meta"):
        model = Qwen2AudioModel(Qwen2AudioConfig.from_name("7b"))
        model.requires_grad_(False)
        if lora:
            targets = lora_lib.select_targets(model, ["projector", "llm"], [ALL_LINEAR])
            lora_lib.apply_lora(model, targets, r, 2.0 * r)
        else:
            model.multi_modal_projector.requires_grad_(True)
            model.language_model.requires_grad_(True)
    return model


def table(seq_len: int = 2048, gpus=(1, 2, 4, 8)) -> str:
    lines = ["| run | GPUs | weights | grads | AdamW | gathered | activations | logits | **per GPU** |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, lora, offload in (("full FT", False, False), ("full FT, CPU offload", False, True),
                                ("LoRA r=8", True, False)):
        shape = Shape.of(seven_b(lora))
        for n in gpus:
            rows = plan(shape, n, seq_len, offload=offload)
            host = f" (+{gib(rows['host'])} host)" if offload else ""
            lines.append(f"| {name} | {n} | " + " | ".join(gib(rows[r]) for r in ROWS)
                         + f" | **{gib(rows['device'] + GPU_OVERHEAD)}**{host} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m qwen2audio.train.memory [seq_len]
    import sys

    print(table(int(sys.argv[1]) if len(sys.argv) > 1 else 2048))
