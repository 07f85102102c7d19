"""LoRA by module swapping: chosen nn.Linear layers become LoRALinear (base + B @ A * alpha / r).

The model code never knows about LoRA. Parameter names follow PEFT (`<path>.base_layer.weight`,
`<path>.lora_A.weight`, `<path>.lora_B.weight`), so an adapter saves as PEFT's
`adapter_model.safetensors` (`base_model.model.<path>.lora_A.weight`) + `adapter_config.json`
and loads with `peft.PeftModel.from_pretrained` on the transformers model.

Module paths: transformers >= 5 names the modules `model.language_model.layers...`,
`model.audio_tower...`, `model.multi_modal_projector...`, `lm_head`; the released layout (ours,
and transformers 4.x) `language_model.model.layers...`, `audio_tower...`, ... Adapters are written
in the transformers-5 layout by default: PEFT's own translation of released-layout keys (peft 0.21)
silently drops the audio_tower / multi_modal_projector ones. `layout="released"` writes the other.
`load_adapter` reads both.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import Qwen2AudioError
from ..weights import canonical_key
from .config import ALL_LINEAR

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# Model parts by module-path prefix (the released layout, which our model uses).
PARTS = {"audio_tower": "audio_tower.", "projector": "multi_modal_projector.", "llm": "language_model."}
LM_HEAD = "language_model.lm_head"
LAYOUTS = ("transformers5", "released")
# released module path prefix -> transformers 5 prefix
_TO_V5 = (("language_model.model.", "model.language_model."), ("audio_tower.", "model.audio_tower."),
          ("multi_modal_projector.", "model.multi_modal_projector."), ("language_model.lm_head", "lm_head"))


def module_path(name: str, layout: str) -> str:
    """Our (released-layout) module path as named in `layout`."""
    if layout == "transformers5":
        for old, new in _TO_V5:
            if name.startswith(old):
                return new + name[len(old):]
    return name


class LoRAError(Qwen2AudioError):
    """Bad LoRA options or an adapter that does not fit the model."""


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = base.weight.device
        # Adapters stay float32 whatever the frozen base's dtype: they are what the optimizer updates.
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init: B = 0, so the model starts unchanged
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        base.requires_grad_(False)

    # Code that reads a Linear's attributes (e.g. model.device -> projector.linear.weight) keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.enabled:
            return out
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return out + (self.lora_B(self.lora_A(h)) * self.scaling).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """The weight update B @ A * scaling (out, in), float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """The base layer with the update added to its weight (in place)."""
        with torch.no_grad():
            self.base_layer.weight.add_(self.delta().to(self.base_layer.weight.dtype))
        return self.base_layer


# ---- choosing and swapping ---------------------------------------------------------------------
def part_of(name: str) -> str | None:
    return next((part for part, prefix in PARTS.items() if name.startswith(prefix)), None)


def select_targets(model: nn.Module, parts: list[str], names: list[str]) -> list[str]:
    """Module paths of the nn.Linear layers in `parts` whose leaf name is in `names` (or all-linear).

    all-linear leaves out lm_head, like PEFT; name it explicitly to adapt it.
    """
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    leaves = {n.rsplit(".", 1)[-1] for n in linear}
    unknown = [t for t in names if t != ALL_LINEAR and t not in leaves]
    if unknown:
        raise LoRAError(f"lora_target_modules: no linear layer named {', '.join(unknown)} "
                        f"(the model has {', '.join(sorted(leaves))}, or use {ALL_LINEAR})")
    out = []
    for name in linear:
        leaf = name.rsplit(".", 1)[-1]
        if part_of(name) not in parts:
            continue
        if leaf in names or (ALL_LINEAR in names and name != LM_HEAD):
            out.append(name)
    if not out:
        raise LoRAError(f"lora_target_modules {names} match no linear layer in the trainable part(s) {', '.join(parts)}")
    return out


def apply_lora(model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float = 0.0) -> list[str]:
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, leaf)
        if not isinstance(base, nn.Linear):
            raise LoRAError(f"{name} is not a plain nn.Linear ({type(base).__name__})")
        setattr(parent, leaf, LoRALinear(base, r, alpha, dropout))
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain nn.Linear back (same state-dict keys)."""
    for name, module in lora_modules(model).items():
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, module.merged())
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model: with B = 0 at the start of training, this is the DPO reference."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


# ---- the PEFT format ---------------------------------------------------------------------------
def target_pattern(targets: list[str]) -> str:
    """A regex (PEFT full-matches a string target_modules against module names) that picks exactly
    `targets` in both layouts transformers uses: released `language_model.model.layers...` and
    v5 `model.language_model.layers...` (plus top-level `lm_head`)."""
    alternatives = []
    for part, prefix in PARTS.items():
        leaves = sorted({t.rsplit(".", 1)[-1] for t in targets if part_of(t) == part and t != LM_HEAD})
        if not leaves:
            continue
        group = "|".join(re.escape(x) for x in leaves)
        if part == "llm":
            alternatives.append(rf"(?:.*\.)?language_model\..*\.(?:{group})")
        else:
            alternatives.append(rf"(?:model\.)?{re.escape(prefix)}(?:.*\.)?(?:{group})")
    if LM_HEAD in targets:
        alternatives.append(r"(?:language_model\.)?lm_head")
    return "^(?:" + "|".join(alternatives) + ")$"


def save_adapter(model: nn.Module, directory: str | Path, base_model: str = "", dropout: float = 0.0,
                 layout: str = "transformers5", weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Path:
    """`weights`: {module path: (A, B)} to write instead of the modules' own (a sharded model's, gathered)."""
    modules = lora_modules(model)
    if not modules:
        raise LoRAError("the model has no LoRA adapters to save")
    if layout not in LAYOUTS:
        raise LoRAError(f"adapter layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    targets = sorted(modules)
    pattern = target_pattern(targets)
    every_linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    if sorted(n for n in every_linear if re.fullmatch(pattern, n)) != targets:  # the regex must pick exactly these
        raise AssertionError(f"target_modules pattern {pattern} does not select exactly the adapted layers")
    first = next(iter(modules.values()))
    tensors = {}
    for name, m in modules.items():
        path = module_path(name, layout)
        a, b = weights[name] if weights is not None else (m.lora_A.weight, m.lora_B.weight)
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.detach().contiguous().cpu()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": dropout, "target_modules": pattern,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _matches(name: str, target_modules) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches a name or a dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Wrap the layers an adapter targets and load its weights (our module paths, released layout)."""
    directory = Path(directory)
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except FileNotFoundError:
        raise LoRAError(f"{directory}: no {ADAPTER_CONFIG}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{directory / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise LoRAError(f"{directory / ADAPTER_CONFIG}: not a JSON object")
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise LoRAError(f"{directory}: only plain LoRA adapters are supported")
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, config["target_modules"])]
    apply_lora(model, targets, int(config["r"]), float(config["lora_alpha"]))
    expected = {f"{n}.lora_{x}.weight" for n in targets for x in "AB"}
    with safe_open(str(directory / ADAPTER_WEIGHTS), framework="pt") as f:
        # either layout -> our module paths
        keys = {canonical_key(k.removeprefix(PEFT_PREFIX)): k for k in f.keys()}
        if set(keys) != expected:
            missing, unexpected = sorted(expected - set(keys)), sorted(set(keys) - expected)
            raise LoRAError(f"{directory}: adapter does not fit the model; "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, key in keys.items():
            with torch.no_grad():
                model.get_parameter(name).copy_(f.get_tensor(key))
    return model


__all__ = ["LoRALinear", "LoRAError", "apply_lora", "load_adapter", "lora_disabled", "lora_modules", "merge_lora",
           "save_adapter", "select_targets", "target_pattern"]
