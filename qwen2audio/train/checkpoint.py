"""Training checkpoints: written atomically, read without pickle.

A checkpoint is a directory `output/checkpoints/step-NNNNNNNN/`:

    trainable.safetensors   trainable parameters by name (full weights or LoRA adapters)
    optimizer.safetensors   AdamW moments per parameter name (`<name>::exp_avg`, ...), RNG states, DPO refs
    state.json              step, data position, optimizer hyper-parameters, the config (written last)

It is first written to a hidden temporary directory, every file and the directory fsync'ed, then
renamed into place in one `os.replace`. A crash (or kill) during a save leaves at worst a
`.tmp-*` directory, which is never read and is removed by the next run; the previous checkpoints
are only pruned after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import Qwen2AudioError

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
PREFIX = "step-"
FORMAT = 1
# --fsdp runs: trainable weights and optimizer state in torch.distributed.checkpoint's sharded layout
# (dcp/: one file per rank + .metadata), the rest as above; readable on any number of ranks.
SHARDED_FORMAT = 2
SHARDED = "dcp"


class CheckpointError(Qwen2AudioError):
    """A checkpoint that is missing, incomplete or does not fit this run."""


@dataclass
class Checkpoint:
    path: Path
    trainable: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor]  # optimizer moments, RNG states, reference log-probs
    state: dict


# ---- writing -----------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    _fsync(path)


def _write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
    _fsync(path)


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save_checkpoint(root: str | Path, step: int, trainable: dict[str, torch.Tensor], extra: dict[str, torch.Tensor],
                    state: dict, keep_last: int) -> Path:
    tmp = new_temporary(root, step)
    try:
        _write_tensors(trainable, tmp / TRAINABLE)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit(root, tmp, step, extra, {"format": FORMAT, **state}, keep_last)


def new_temporary(root: str | Path, step: int) -> Path:
    """The hidden directory a checkpoint is written into before `commit` renames it into place."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{checkpoint_name(step)}-", dir=root))


def commit(root: str | Path, tmp: Path, step: int, extra: dict[str, torch.Tensor], state: dict, keep_last: int) -> Path:
    """Write the extra tensors and state.json (last) into `tmp`, fsync it, rename it to step-N, prune."""
    root = Path(root)
    final = root / checkpoint_name(step)
    try:
        _write_tensors(extra, tmp / OPTIMIZER)
        _write_json(state, tmp / STATE)  # last: a directory with state.json is complete
        _fsync(tmp)
        old = None
        if final.exists():  # the same step saved again (e.g. after a resume): move the old one aside first
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(root, keep_last)
    return final


def prune(root: Path, keep_last: int) -> None:
    for path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def clean_partial(root: str | Path) -> list[Path]:
    """Remove what interrupted saves left behind (never a complete checkpoint)."""
    root = Path(root)
    removed = [p for p in root.glob(".tmp-*") if p.is_dir()] if root.is_dir() else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


# ---- reading -----------------------------------------------------------------------------------
def step_of(path: Path) -> int | None:
    """The step a checkpoint folder (OUTPUT/checkpoints/step-N) holds, from its name; None for other names."""
    name = path.name
    if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
        return None
    return int(name[len(PREFIX):])


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None and (p / STATE).is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_state(path: str | Path) -> dict:
    """A complete checkpoint's state.json (either format)."""
    path = Path(path)
    if not (path / STATE).is_file():
        raise CheckpointError(f"{path}: not a training checkpoint (no {STATE})")
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / STATE}: not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE}: not a JSON object")
    if state.get("format") not in (FORMAT, SHARDED_FORMAT):
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT} or {SHARDED_FORMAT}")
    return state


def read_extra(path: str | Path) -> dict[str, torch.Tensor]:
    return _read_tensors(Path(path) / OPTIMIZER)


def load_checkpoint(path: str | Path, extra: bool = True) -> Checkpoint:
    """Read a step directory; extra=False skips the optimizer file (enough to export the weights)."""
    path = Path(path)
    state = read_state(path)
    if state.get("format") == SHARDED_FORMAT:
        raise CheckpointError(f"{path}: a sharded (--fsdp) checkpoint; read it with train.fsdp")
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT}")
    return Checkpoint(path, _read_tensors(path / TRAINABLE), _read_tensors(path / OPTIMIZER) if extra else {}, state)


# ---- optimizer state as named tensors + JSON ---------------------------------------------------
def optimizer_to_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """AdamW's state keyed by parameter name (stable across runs), hyper-parameters as JSON."""
    sd = optimizer.state_dict()
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    tensors = {}
    for index, st in sd["state"].items():
        for key, value in st.items():
            tensors[f"{order[index]}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    meta = {"param_groups": groups, "param_names": [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]}
    return tensors, meta


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict, meta: dict) -> None:
    current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    if current != meta["param_names"]:
        raise CheckpointError("the checkpoint's optimizer covers other parameters than this run trains "
                              "(were the freeze / LoRA options changed?)")
    flat = [n for group in current for n in group]
    state = {}
    for index, name in enumerate(flat):
        st = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "::")}
        if st:
            state[index] = st
    groups, start = [], 0
    for saved, names_in_group in zip(meta["param_groups"], current):
        hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}  # JSON turned betas into a list
        groups.append({**hyper, "params": list(range(start, start + len(names_in_group)))})
        start += len(names_in_group)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


__all__ = ["Checkpoint", "CheckpointError", "clean_partial", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "optimizer_from_tensors", "optimizer_to_tensors", "save_checkpoint", "step_of"]
