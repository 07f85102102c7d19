"""The training configuration: one flat, typed dataclass, filled from defaults < TOML file < flags < --set.

Flat keys keep `--set key=value` trivial; a TOML table is accepted as a prefix (`[lora] r = 8` is
`lora_r = 8`, `[lora] enabled = true` is `lora = true`), so config files can still be grouped.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib

from ..errors import Qwen2AudioError

STAGES = ("pretrain", "sft", "dpo")
PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = ("float32", "bfloat16", "float16")
TRUNCATIONS = ("drop", "cut")
DPO_REFERENCES = ("copy", "precompute")
# The LLM's linear layers; the audio tower's are q_proj/k_proj/v_proj/out_proj/fc1/fc2, the projector's `linear`.
ALL_LINEAR = "all-linear"


class TrainConfigError(Qwen2AudioError):
    """An invalid training configuration (unknown key, bad value, conflicting options)."""


@dataclass
class TrainConfig:
    # ---- what to train on --------------------------------------------------------------------
    stage: str = "sft"  # pretrain | sft | dpo
    model: str = ""  # checkpoint directory (Hugging Face layout)
    data: str = ""  # JSONL training file
    output: str = ""  # output directory: final checkpoint, checkpoints/, metrics.jsonl, adapter/
    eval_data: str = ""  # optional held-out JSONL
    eval_every: int = 0  # steps between evaluations (0: only at the end, when eval_data is set)
    max_length: int = 2048  # tokens per sequence, audio tokens included
    truncation: str = "drop"  # drop | cut: what to do with longer sequences (never cuts inside an audio block)
    skip_bad_records: bool = False  # skip invalid JSONL records (reported) instead of failing
    # ---- trainable parts ---------------------------------------------------------------------
    freeze_audio_tower: bool = True
    freeze_projector: bool = False
    freeze_llm: bool = False
    lora: bool = False  # LoRA adapters on the unfrozen parts instead of training their weights
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])  # leaf names, or all-linear
    # The trainable parts that get adapters (empty: all of them); the other trainable parts train in full, so
    # e.g. the audio tower can learn through LoRA while the small projector is trained whole.
    lora_parts: list[str] = field(default_factory=list)
    merge_lora: bool = True  # write merged full weights to `output` (the adapter is written to output/adapter)
    adapter_layout: str = "transformers5"  # module names in adapter keys: transformers5 | released (transformers 4.x)
    # ---- optimisation ------------------------------------------------------------------------
    lr: float = 1e-5
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    batch_size: int = 1  # sequences (DPO: pairs) per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    stop_at_step: int = 0  # > 0: save and stop after this step (the schedule still spans the whole run)
    seed: int = 42
    # ---- DPO ---------------------------------------------------------------------------------
    beta: float = 0.1
    rpo_alpha: float = 0.0  # > 0: add rpo_alpha x the chosen answer's mean token NLL to each pair's loss (RPO)
    dpo_reference: str = "copy"  # copy (frozen copy, or adapters off with LoRA) | precompute (log-probs once)
    # ---- precision, memory, device -----------------------------------------------------------
    precision: str = "auto"  # auto (bf16 autocast on GPUs that support it, else fp32) | fp32 | bf16
    model_dtype: str = "float32"  # dtype of frozen weights; trainable ones are always float32
    save_dtype: str = "auto"  # dtype of the exported weights: auto = the input checkpoint's
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: each rank's local GPU)
    num_workers: int = 0  # DataLoader worker processes
    fsdp: bool = False  # shard weights, gradients and optimizer state over the ranks (FSDP2); sharded checkpoints
    fsdp_cpu_offload: bool = False  # with fsdp: keep the shards (and the optimizer step) in CPU memory
    audio_cache_gb: float = 4.0  # frozen audio tower: keep its outputs in RAM up to this size and reuse them (0: off)
    # ---- checkpoints and logging -------------------------------------------------------------
    save_every: int = 0  # steps between checkpoints (0: only the last step)
    keep_last: int = 2  # checkpoints kept in output/checkpoints
    resume: str = ""  # "" | latest | a checkpoint directory
    log_every: int = 1  # steps between metrics.jsonl lines
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        self.validate(partial=True)

    # ---- checks ------------------------------------------------------------------------------
    def validate(self, partial: bool = False) -> "TrainConfig":
        """Raise TrainConfigError on bad values; `partial` skips the required paths (not set yet)."""
        def choice(name, options):
            if getattr(self, name) not in options:
                raise TrainConfigError(f"{name}={getattr(self, name)!r}: choose from {', '.join(options)}")

        choice("stage", STAGES)
        choice("precision", PRECISIONS)
        choice("model_dtype", DTYPES)
        choice("save_dtype", ("auto",) + DTYPES)
        choice("truncation", TRUNCATIONS)
        choice("dpo_reference", DPO_REFERENCES)
        choice("adapter_layout", ("transformers5", "released"))
        for name in ("max_length", "batch_size", "grad_accum", "epochs", "lora_r", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise TrainConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "warmup_steps", "max_steps", "stop_at_step", "save_every", "num_workers"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm", "lora_dropout", "min_lr_ratio", "adam_eps", "audio_cache_gb",
                     "rpo_alpha"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise TrainConfigError(f"lr must be > 0, got {self.lr}")
        if not self.beta > 0:
            raise TrainConfigError(f"beta must be > 0, got {self.beta}")
        if self.lora_dropout >= 1 or self.min_lr_ratio > 1:
            raise TrainConfigError("lora_dropout must be < 1 and min_lr_ratio <= 1")
        if self.freeze_audio_tower and self.freeze_projector and self.freeze_llm:
            raise TrainConfigError("nothing to train: the audio tower, projector and LLM are all frozen")
        if self.model_dtype != "float32" and self.precision == "fp32":
            raise TrainConfigError(f"model_dtype={self.model_dtype} needs precision=bf16 or auto (autocast)")
        if self.fsdp_cpu_offload and not self.fsdp:
            raise TrainConfigError("fsdp_cpu_offload needs fsdp (--fsdp)")
        if not self.lora_target_modules:
            raise TrainConfigError("lora_target_modules is empty")
        trainable = [part for part, frozen in (("audio_tower", self.freeze_audio_tower),
                     ("projector", self.freeze_projector), ("llm", self.freeze_llm)) if not frozen]
        for part in self.lora_parts:
            if part not in trainable:
                raise TrainConfigError(f"lora_parts: {part!r} is not a trainable part (trainable: {', '.join(trainable)})")
        if self.eval_every and not self.eval_data and not partial:
            raise TrainConfigError("eval_every needs eval_data (--eval-data FILE.jsonl)")
        if not partial:
            for name in ("model", "data", "output"):
                if not getattr(self, name):
                    raise TrainConfigError(f"missing {name}: pass --{name} or set it in the config file")
        return self

    # ---- building ----------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_sources(cls, file: str | None = None, values: dict[str, Any] | None = None,
                     overrides: list[str] | None = None) -> "TrainConfig":
        """Defaults, then the TOML `file`, then typed `values` (explicit flags), then `key=value` strings."""
        merged: dict[str, Any] = {}
        if file:
            merged.update(load_toml(file))
        for key, value in (values or {}).items():
            merged[_check_key(key, "option")] = value
        for item in overrides or []:
            key, sep, text = item.partition("=")
            if not sep:
                raise TrainConfigError(f"--set {item!r}: expected key=value")
            key = _check_key(key.strip().replace("-", "_"), "--set")
            merged[key] = parse_value(key, text.strip())
        typed = {k: _coerce(k, v) for k, v in merged.items()}
        try:
            return cls(**typed)
        except TypeError as e:  # pragma: no cover - keys are checked above
            raise TrainConfigError(str(e)) from None

    # ---- printing ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML that `--config` reads back."""
        return "".join(f"{k} = {_toml_value(v)}\n" for k, v in self.to_dict().items())


# ---- helpers -----------------------------------------------------------------------------------
_HINTS = typing.get_type_hints(TrainConfig)


def _check_key(key: str, where: str) -> str:
    if key not in _HINTS:
        close = [n for n in _HINTS if key in n or n in key]
        hint = f" (did you mean {', '.join(close[:3])}?)" if close else ""
        raise TrainConfigError(f"{where}: unknown config key {key!r}{hint}")
    return key


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: no such config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TrainConfigError(f"{path}: not valid TOML ({e})") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # [lora] r = 8  ->  lora_r = 8; [lora] enabled = true  ->  lora = true
            for sub, v in value.items():
                flat[_check_key(key if sub == "enabled" else f"{key}_{sub}", str(path))] = v
        else:
            flat[_check_key(key, str(path))] = value
    return flat


def parse_value(key: str, text: str) -> Any:
    """A `--set` value typed by the field: bools as true/false, lists comma-separated."""
    hint = _HINTS[key]
    if hint is bool:
        low = text.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise TrainConfigError(f"{key}={text!r}: expected true or false")
    if typing.get_origin(hint) is list:
        return [t.strip() for t in text.split(",") if t.strip()]
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise TrainConfigError(f"{key}={text!r}: expected an integer") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise TrainConfigError(f"{key}={text!r}: expected a number") from None
    return text


def _coerce(key: str, value: Any) -> Any:
    """Check a TOML / Python value against the field's type (ints are accepted for floats)."""
    hint = _HINTS[key]
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TrainConfigError(f"{key}: expected a list of strings, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, Path):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise TrainConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


__all__ = ["TrainConfig", "TrainConfigError", "STAGES", "ALL_LINEAR"]
