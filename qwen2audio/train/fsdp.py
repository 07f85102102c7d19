"""Sharded data parallelism (`--fsdp`): PyTorch's FSDP2 (`fully_shard`) and torch.distributed.checkpoint.

Replicated training (DistributedDataParallel) keeps the whole model, its gradients and AdamW's moments on
every rank: about 16 bytes per trained parameter, 135 GB for Qwen2-Audio-7B, more than any one GPU has.
Here each rank keeps 1/N of them:

- every decoder layer, every encoder layer (when the audio tower trains), the token embeddings and
  lm_head (when untied) and the projector are a unit of their own: gathered just before their forward
  (and again for backward), freed after it, their gradients reduce-scattered in float32;
- with bf16 the gathered copies and the compute are bf16 while the shards (the optimizer's master
  weights) stay float32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`);
- a frozen audio tower is not sharded: it has no gradients and no optimizer state, it is 1.3 GB in bf16
  for the 7B model, and keeping it whole lets each rank run it (or skip it, through the output cache)
  without the collectives a shard would need;
- `fsdp_cpu_offload` keeps the shards, their gradients and the optimizer step in host memory.

Checkpoints are written with torch.distributed.checkpoint (each rank its own shard; any number of ranks
can read them back) inside the same atomic temporary-directory-then-rename protocol as checkpoint.py.
The final model is exported one tensor at a time: each is gathered, rank 0 appends it to the current
safetensors shard file and writes that file when it is full, so no rank ever holds the whole model.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from . import checkpoint as ckpt
from . import lora as lora_lib
from .config import TrainConfig, TrainConfigError

# Files of the exported model are cut at this size: rank 0 holds at most one such file while writing.
EXPORT_SHARD_BYTES = 2 * 2**30


# ---- sharding ----------------------------------------------------------------------------------
def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """The same rule as setup.autocast: bf16 when asked, or with `auto` on a GPU that supports it."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def _upcast_trainable(module: nn.Module) -> None:
    """The optimizer updates float32 masters whatever dtype the frozen weights use (one unit at a time, so a
    rank never holds a float32 copy of the whole model)."""
    for p in module.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def shard(model: nn.Module, cfg: TrainConfig, device: torch.device, world: int) -> dict:
    """fully_shard the model in place, unit by unit (see the module docstring). Returns what was done."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    # The projector's output is a view (nn.Linear on 3-D input); nothing writes to it in place.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPMultiModalProjector\) returned a view")
    mesh = init_device_mesh(device.type, (world,))
    bf16 = uses_bf16(cfg, device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    if cfg.fsdp_cpu_offload and device.type != "cuda":
        raise TrainConfigError("fsdp_cpu_offload moves shards off a GPU: it needs --device cuda")
    offload = CPUOffloadPolicy() if cfg.fsdp_cpu_offload else OffloadPolicy()

    def unit(module: nn.Module, **kw) -> None:
        _upcast_trainable(module)
        fully_shard(module, mesh=mesh, mp_policy=mp, offload_policy=offload, **kw)

    tower = model.audio_tower
    tower_sharded = any(p.requires_grad for p in tower.parameters())
    units = 0
    if tower_sharded:
        for layer in tower.layers:
            unit(layer)
            units += 1
    lm = model.language_model
    for layer in lm.model.layers:
        unit(layer)
        units += 1
    if lm.lm_head.weight is not lm.model.embed_tokens.weight:  # tied weights must stay in one unit
        unit(lm.model.embed_tokens)
        unit(lm.lm_head)
        units += 2
    # Its own unit even when small: FSDP casts a unit's inputs to bf16, and the tower's output may be float32.
    unit(model.multi_modal_projector)
    units += 1
    ignored = set() if tower_sharded else set(tower.parameters())
    # The root unit: the final norm (+ the tower's convolutions and norm when it trains).
    unit(model, ignored_params=ignored, reshard_after_forward=False)
    if not tower_sharded:
        tower.to(device)  # ignored by FSDP: moved by hand, whole on each rank
    _always_run_audio(model)
    return {"units": units + 1, "bf16": bf16, "tower_sharded": tower_sharded, "offload": cfg.fsdp_cpu_offload}


def _always_run_audio(model: nn.Module) -> None:
    """Every rank must run the same collectives in the same order. A batch without audio would skip the
    projector's (and a sharded tower's) gathers on that rank only, and leave them without gradients to
    reduce; so such a batch also runs one tiny silent window through the audio side, times 0."""
    forward, embed = model.forward, model.embed
    n_mels = model.config.audio_config.num_mel_bins

    def forward_with_audio(input_ids, *args, input_features=None, **kw):
        if input_features is not None or (len(args) > 1 and args[1] is not None):
            return forward(input_ids, *args, input_features=input_features, **kw)
        # The model's own forward, with the silent window's embeddings (times 0) joining the token embeddings
        # where real audio would: the units' gathers, and in backward their reductions, keep the order of a
        # rank with audio.
        device = model.device
        frames = 8
        silent = model.encode_audio(torch.zeros(1, n_mels, frames, device=device),
                                    torch.ones(1, frames, dtype=torch.long, device=device))
        nothing = 0 * sum(e.sum() for e in silent)
        model.embed = lambda ids, audio=None: embed(ids, audio) + nothing  # a 0-dim float: keeps the embeddings' dtype
        try:
            return forward(input_ids, *args, **kw)
        finally:
            del model.embed  # back to the class's method

    model.forward = forward_with_audio  # an instance attribute: FSDP's hooks on __call__ still run around it


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_tensor(t: torch.Tensor, comm_device: torch.device) -> torch.Tensor:
    """The whole tensor on every rank (a collective for a sharded one)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    if t.device != comm_device:  # CPU-offloaded shards are gathered through the GPU with NCCL
        t = t.to(comm_device)
    return t.full_tensor()


def scalar(x) -> float:
    """A (possibly sharded) scalar tensor, e.g. clip_grad_norm_'s total norm, as a float."""
    from torch.distributed.tensor import DTensor

    return float(x.full_tensor() if isinstance(x, DTensor) else x)


def lockstep_padding(n: int, batch_size: int, rank: int, world: int) -> int:
    """How many extra batches this rank must run (results discarded) so that every rank runs as many
    batches as the rank with the most: a sharded model's forward is a collective."""
    mine = len(range(rank, n, world))
    most = len(range(0, n, world))
    return math.ceil(most / batch_size) - math.ceil(mine / batch_size)


# ---- memory actually held ----------------------------------------------------------------------
def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's bytes of weights (trainable / frozen), gradients and optimizer state, local shards only."""
    out = {"trainable_weights": 0, "frozen_weights": 0, "grads": 0, "optimizer": 0}
    for p in model.parameters():
        local = local_tensor(p)
        out["trainable_weights" if p.requires_grad else "frozen_weights"] += local.numel() * local.element_size()
        if p.grad is not None:
            g = local_tensor(p.grad)
            out["grads"] += g.numel() * g.element_size()
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.ndim > 0:  # AdamW's moments, not its 0-dim step count
                v = local_tensor(v)
                out["optimizer"] += v.numel() * v.element_size()
    return out


# ---- checkpoints -------------------------------------------------------------------------------
def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Trainable weights only, like checkpoint.py. Not strict: loading would then ask for the frozen ones too;
    # the callers compare the checkpoint's names with the model's trainable ones first.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save(root: Path, step: int, model, optimizer, extra: dict[str, torch.Tensor], state: dict, keep_last: int,
         is_main: bool, gather) -> Path | None:
    """Every rank writes its shard of the trainable weights and the optimizer into one temporary directory
    (on a filesystem all ranks share), then rank 0 adds the rest and renames it into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = ckpt.new_temporary(root, step) if is_main else None
    tmp = Path(gather(str(tmp) if tmp else None)[0])
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / ckpt.SHARDED))
    except BaseException:
        if is_main:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.is_initialized():
        dist.barrier()  # every shard is on disk before the directory becomes a checkpoint
    if not is_main:
        return None
    return ckpt.commit(root, tmp, step, extra, {"format": ckpt.SHARDED_FORMAT, **state}, keep_last)


def load(path: Path, model, optimizer=None) -> None:
    """Read a sharded checkpoint's trainable weights (and optimizer state) into `model`, sharded or not,
    on however many ranks: DCP reshards from the saved layout to the current one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict, get_model_state_dict, \
        set_model_state_dict

    where = str(Path(path) / ckpt.SHARDED)
    alone = not dist.is_initialized()  # e.g. export-checkpoint: one process reads every shard
    if optimizer is None:
        model_sd = get_model_state_dict(model, options=_options())
        dcp.load({"model": model_sd}, checkpoint_id=where, no_dist=alone)
        set_model_state_dict(model, model_sd, options=_options())
        return
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options())
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=where, no_dist=alone)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_options())


def trainable_names(path: Path) -> set[str]:
    """The parameter names a sharded checkpoint holds (from its metadata, without reading tensors)."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(Path(path) / ckpt.SHARDED)).read_metadata()
    return {k[len("model."):] for k in meta.state_dict_metadata if k.startswith("model.")}


# ---- the final model, streamed -----------------------------------------------------------------
class ShardWriter:
    """Safetensors files of at most `limit` bytes, written as they fill; named and indexed at the end
    the way weights.save_model names them (model.safetensors alone, else model-0000i-of-0000N + index)."""

    def __init__(self, directory: Path, limit: int = EXPORT_SHARD_BYTES):
        self.directory, self.limit = directory, limit
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0
        self.peak = 0  # most bytes held at once (the current file's tensors)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.limit:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes
        self.peak = max(self.peak, self.size)

    def _flush(self) -> None:
        part = self.directory / f".model-part-{len(self.files):05d}.safetensors"
        save_file(self.current, str(part), metadata={"format": "pt"})
        self.files.append((part, list(self.current)))
        self.current, self.size = {}, 0

    def close(self) -> list[Path]:
        if self.current or not self.files:
            self._flush()
        for stale in list(self.directory.glob("model*.safetensors")) + [self.directory / "model.safetensors.index.json"]:
            stale.unlink(missing_ok=True)
        if len(self.files) == 1:
            target = self.directory / "model.safetensors"
            os.replace(self.files[0][0], target)
            return [target]
        weight_map, written = {}, []
        for i, (part, names) in enumerate(self.files, 1):
            target = self.directory / f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(part, target)
            weight_map.update({n: target.name for n in names})
            written.append(target)
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return written


def export(model: nn.Module, cfg: TrainConfig, processor, is_main: bool, comm_device: torch.device, dtype: torch.dtype,
           say=print) -> dict:
    """Write `cfg.output` as an ordinary checkpoint directory (+ the PEFT adapter with LoRA) from a sharded
    model: every rank takes part in gathering each tensor in turn; rank 0 merges LoRA and writes."""
    from .setup import write_side_files

    out = Path(cfg.output)
    lora_mods = lora_lib.lora_modules(model)
    adapters = {}
    for name, m in lora_mods.items():  # small: r x (in + out) per adapted layer
        adapters[name] = (full_tensor(m.lora_A.weight, comm_device).detach().float().cpu(),
                          full_tensor(m.lora_B.weight, comm_device).detach().float().cpu())
    if is_main and lora_mods:
        lora_lib.save_adapter(model, out / "adapter", base_model=cfg.model, dropout=cfg.lora_dropout,
                              layout=cfg.adapter_layout, weights=adapters)
        say(f"LoRA adapter (PEFT format) written to {out / 'adapter'}")
    if lora_mods and not cfg.merge_lora:
        return {"adapter_only": True}
    writer = ShardWriter(out) if is_main else None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        owner, _, sub = module_name.rpartition(".")
        if owner in lora_mods and sub in ("lora_A", "lora_B"):
            continue  # written as the adapter, merged below
        owner = module_name.removesuffix(".base_layer")
        sharded = full_tensor(tensor, comm_device).detach()
        if not is_main:
            continue
        full = sharded.cpu() if sharded is not tensor else tensor.detach().cpu().clone()  # never a view of the model
        if module_name.endswith(".base_layer") and owner in lora_mods:
            if leaf == "weight":
                a, b = adapters[owner]
                full = full.float() + (b @ a) * lora_mods[owner].scaling
            name = f"{owner}.{leaf}"
        if full.is_floating_point():
            full = full.to(dtype)
        writer.add(name, full)
    if not is_main:
        return {}
    files = writer.close()
    model.config.save(out)
    write_side_files(cfg, processor, out)
    say(f"model written to {out} ({str(dtype).removeprefix('torch.')}, {len(files)} file(s), streamed one tensor "
        f"at a time: at most {writer.peak / 2**20:.0f} MiB held)")
    return {"files": len(files), "peak_bytes": writer.peak}


__all__ = ["export", "held_bytes", "load", "lockstep_padding", "save", "shard", "uses_bf16"]
