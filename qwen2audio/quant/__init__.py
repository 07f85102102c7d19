"""Weight-only quantisation by module swapping: `quantize_model(model, "int8" | "int4")`.

The model code never knows: chosen nn.Linear layers become Int8Linear / Int4Linear (see linear.py for
the formats and kernels). What is quantised:

- the LLM's linear layers (attention q/k/v/o, MLP gate/up/down): int8 per channel, or int4 in groups;
- its lm_head (151,936 x 896 on the default model, a quarter of the LLM's weights and so a quarter of
  every decode step's reads): int8 in both modes. 4 bits there costs more quality than it saves time,
  the same choice llama.cpp's Q4_K_M makes (its output matrix is Q8_0 / Q6_K);
- the audio encoder only with `audio=True`: it runs once per clip, compute-bound, where low-bit weights
  save memory but not time.

The token embeddings stay as they are (a lookup reads one row per token).
"""

from __future__ import annotations

from torch import nn

from ..errors import Qwen2AudioError
from .linear import Int4Linear, Int8Linear, QuantLinear

MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = 32


class QuantizationError(Qwen2AudioError, ValueError):
    """An unknown quantisation mode or a model shape it cannot handle."""


def _swap(parent: nn.Module, make) -> int:
    """Replace every nn.Linear under `parent` (parent itself excluded) by make(linear); return the count."""
    count = 0
    for name, child in list(parent.named_children()):
        if isinstance(child, nn.Linear):
            setattr(parent, name, make(child))
            count += 1
        else:
            count += _swap(child, make)
    return count


def quantize_model(model: nn.Module, mode: str, group_size: int = DEFAULT_GROUP_SIZE, lm_head: bool = True,
                   audio: bool = False) -> nn.Module:
    """Quantise a Qwen2AudioModel's weights in place (see the module docstring); returns the model."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantisation {mode!r}; choose from {', '.join(MODES)}")
    int8 = lambda lin: Int8Linear(lin.weight, lin.bias)  # noqa: E731
    if mode == "int8":
        body = int8
    else:
        def body(lin: nn.Linear) -> nn.Module:
            if lin.in_features % group_size:
                raise QuantizationError(f"int4: in_features={lin.in_features} is not a multiple of the group size "
                                        f"{group_size}")
            return Int4Linear(lin.weight, lin.bias, group_size=group_size)
    lm = model.language_model
    _swap(lm.model, body)
    if lm_head:
        lm.lm_head = int8(lm.lm_head)
    if audio:
        _swap(model.audio_tower, body)
    model.quantization = mode
    return model


__all__ = ["MODES", "Int4Linear", "Int8Linear", "QuantLinear", "QuantizationError", "quantize_model"]
