"""Checkpoint directories in the Hugging Face layout: safetensors only (never pickle), sharded and
memory-mapped on load; both key layouts that transformers has written are accepted.

Plain tensor I/O: names -> tensors and back. It knows no model class (the model builds itself from what
`read_checkpoint` returns, in `Qwen2AudioModel.from_pretrained`), so imports run one way: model -> weights."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError
from .errors import Qwen2AudioError

LM_HEAD = "language_model.lm_head.weight"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Newer transformers save Qwen2-Audio as model.{audio_tower,multi_modal_projector,language_model}.* and a
# top-level lm_head; the released checkpoints (and what we write) use the older names below.
_KEY_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
    # transformers 5.17 writes the decoder body one `model.` too deep (seen on its save_pretrained output).
    ("language_model.model.model.", "language_model.model."),
)


class CheckpointError(Qwen2AudioError):
    """A checkpoint directory that is missing, incomplete or in the wrong format."""


def canonical_key(key: str) -> str:
    for new, old in _KEY_RENAMES:
        if key.startswith(new):
            return old + key[len(new):]
    return key


def shard_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (directory / n).exists()]
        if missing:
            raise CheckpointError(f"{directory}: shards listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return [directory / n for n in names]
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory}: only pickle weights (*.bin/*.pt) found; qwen2audio loads safetensors only "
            "(convert them once with a trusted tool, e.g. transformers' save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


def check_directory(path: str | Path) -> Path:
    directory = Path(path).expanduser()
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: expected a checkpoint directory, got a file")
    return directory


def read_checkpoint(directory: Path, device="cpu", dtype: torch.dtype | None = None,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory under its canonical (released-layout) name, memory-mapped, moved
    to `device` and floating-point ones cast to `dtype` (None keeps the stored dtype)."""
    files = shard_files(directory)
    state: dict[str, torch.Tensor] = {}
    bar = _progress(files, progress, directory.name)
    for file in files:
        try:
            _read_shard(file, state, device, dtype, bar)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    if bar is not None:
        bar.close()
    return state


def _read_shard(file: Path, state: dict, device, dtype, bar=None) -> None:
    with safe_open(str(file), framework="pt", device="cpu") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)  # memory-mapped
            target = dtype or (tensor.dtype if tensor.is_floating_point() else None)
            state[canonical_key(key)] = tensor.to(device=device, dtype=target) if target else tensor.to(device)
            if bar is not None:
                bar.update(tensor.numel() * tensor.element_size())


def write_checkpoint(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `state` as model.safetensors, or as model-0000i-of-0000N.safetensors shards + index when it is
    larger than `max_shard_bytes`; each file through a temporary name, stale shards removed first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: t.contiguous().cpu() for name, t in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for stale in list(directory.glob("model*.safetensors")) + [directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _atomic_save(shards[0], directory / SINGLE_FILE)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, directory / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _atomic_save(tensors: dict[str, torch.Tensor], target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _progress(files: list[Path], enabled: bool, label: str):
    """A byte-level bar (a 16 GB checkpoint is often one or a few shards), or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in files)
    return tqdm(total=total, desc=f"loading {label}", unit="B", unit_scale=True, unit_divisor=1024, leave=False)


__all__ = ["CheckpointError", "ConfigError", "canonical_key", "check_directory", "read_checkpoint", "shard_files",
           "write_checkpoint"]
