"""torch.distributed for the trainer: the same command runs alone or under `torchrun --nproc_per_node N`.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; then each process joins a process group (NCCL on
GPUs, gloo on CPU), trains on its shard of the data inside DistributedDataParallel, and only
rank 0 writes checkpoints, metrics and the final model.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..api import DeviceError, check_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    own_group: bool = False  # a one-process group started for FSDP (not by torchrun)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's `obj`, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    @property
    def comm_device(self) -> torch.device:
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")

    def no_sync(self, model: nn.Module, sync: bool):
        """Skip DDP's gradient all-reduce (FSDP's reduce-scatter) on all but the last micro-batch of a step."""
        if self.enabled and hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if self.enabled and not sync:
            return model.no_sync()
        return contextlib.nullcontext()


def resolve_device(option: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    device = check_device(option)
    if device.type == "cuda" and distributed:  # one GPU per process
        device = check_device(f"cuda:{local_rank}")
    return device


def setup(device_option: str, group_alone: bool = False) -> Dist:
    """`group_alone`: start a one-process group when not under torchrun (FSDP needs one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        d = Dist(device=resolve_device(device_option))
        if group_alone and not dist.is_initialized():
            store = dist.FileStore(tempfile.mktemp(prefix="qwen2audio-group-"), 1)
            dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo", store=store, rank=0, world_size=1,
                                    device_id=d.device if d.device.type == "cuda" else None)
            d.own_group = True
        return d
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_option, local_rank, distributed=True)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
        # Processes on one machine share its cores; without this each would start one thread per core.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return Dist(rank, world, local_rank, device)


def teardown(d: Dist) -> None:
    if (d.enabled or d.own_group) and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, d: Dist, find_unused: bool) -> nn.Module:
    """DistributedDataParallel around the model (a no-op alone). DDP broadcasts rank 0's weights at
    construction, so every replica starts equal; `find_unused` is needed when some batches leave
    trainable parts unused (e.g. text-only batches with a trainable audio side)."""
    if not d.enabled:
        return model
    ids = [d.device.index] if d.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def replicas_in_sync(model: nn.Module, d: Dist, tol: float = 1e-6) -> bool:
    """Compare a checksum of the trainable weights across ranks (a guard against silent divergence)."""
    if not d.enabled:
        return True
    with torch.no_grad():
        total = sum(float(p.double().sum()) for p in model.parameters() if p.requires_grad)
    sums = d.gather(total)
    return max(sums) - min(sums) <= tol * max(1.0, abs(sums[0]))


__all__ = ["DeviceError", "Dist", "replicas_in_sync", "resolve_device", "setup", "teardown", "wrap"]
