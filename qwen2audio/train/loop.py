"""The training loop, explicit and top to bottom (in the spirit of nanoGPT / torchtune).

    train(cfg): set up ranks -> data -> model (freeze / LoRA / checkpointing / FSDP) -> optimizer -> resume?
                -> for each step: lr, micro-batches, forward + backward, clip, AdamW step, log,
                   evaluate, checkpoint -> export the final checkpoint directory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..processor import Qwen2AudioProcessor
from ..weights import check_directory
from . import checkpoint as ckpt
from . import distributed, fsdp, memory, setup
from .config import TrainConfig, TrainConfigError
from .data import BatchStream, Collate, ExampleDataset, eval_batches
from .objectives import DPOObjective, LMObjective, logits_of, precompute_reference
from .records import load_examples
from .tower_cache import TowerCache

# Options a resumed run must share with the checkpoint's run: they shape the weights, the optimizer or the data order.
RESUME_INVARIANTS = ("stage", "model", "data", "freeze_audio_tower", "freeze_projector", "freeze_llm", "lora", "lora_r",
                     "lora_alpha", "lora_target_modules", "lora_parts", "batch_size", "grad_accum", "seed", "beta",
                     "rpo_alpha", "dpo_reference")


@dataclass
class TrainResult:
    output: Path
    step: int
    finished: bool  # False when stopped early by stop_at_step
    history: list[dict] = field(default_factory=list)  # metrics.jsonl records of this run
    model: torch.nn.Module | None = None


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warmup over warmup_steps, then cosine from lr down to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - floor)


def train(cfg: TrainConfig) -> TrainResult:
    cfg.validate()
    d = distributed.setup(cfg.device, group_alone=cfg.fsdp)
    try:
        return _train(cfg, d)
    finally:
        distributed.teardown(d)


def _train(cfg: TrainConfig, d: distributed.Dist) -> TrainResult:
    say = (lambda msg: print(msg, flush=True)) if d.is_main else (lambda msg: None)
    warn = (lambda msg: print(msg, file=sys.stderr, flush=True)) if d.is_main else (lambda msg: None)
    out = Path(cfg.output)
    ckpt_root = out / "checkpoints"
    resume_from = _resume_path(cfg, ckpt_root)
    if resume_from is None and ckpt.list_checkpoints(ckpt_root):
        # Mixing two runs' checkpoints would make --resume pick the wrong one.
        raise TrainConfigError(f"{out} already holds checkpoints of an earlier run: continue it with --resume, "
                               "or choose another --output")
    say(f"# qwen2audio train: resolved config ({d.world} process(es), device {d.device})\n{cfg.to_toml()}")
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.toml").write_text(cfg.to_toml())
        for stale in ckpt.clean_partial(ckpt_root):
            warn(f"removed an interrupted checkpoint save: {stale}")
    torch.manual_seed(cfg.seed + d.rank)  # LoRA dropout masks differ per rank; the data order does not use it

    # ---- data ---------------------------------------------------------------------------------
    processor = Qwen2AudioProcessor.from_pretrained(check_directory(cfg.model))
    tok = processor.tokenizer

    def load(path):
        return load_examples(path, cfg.stage, tok, cfg.max_length, cfg.truncation, cfg.skip_bad_records, warn).examples

    train_set = ExampleDataset(load(cfg.data))
    eval_set = ExampleDataset(load(cfg.eval_data)) if cfg.eval_data else None
    collate = Collate(tok.pad_id, processor.n_mels)
    eval_collate = Collate(tok.pad_id, processor.n_mels, split="eval")
    stream = BatchStream(train_set, collate, cfg.batch_size, cfg.seed, d.rank, d.world, cfg.num_workers)
    total = cfg.max_steps or math.ceil(cfg.epochs * stream.per_epoch / cfg.grad_accum)
    unit = "pairs" if cfg.stage == "dpo" else "sequences"
    say(f"data: {len(train_set)} training examples" + (f", {len(eval_set)} held-out" if eval_set else "")
        + f"; {total} steps of {cfg.batch_size} x {cfg.grad_accum} x {d.world} {unit}")

    # ---- model --------------------------------------------------------------------------------
    # FSDP: each rank maps the checkpoint (page cache, shared) and copies only its shards to its device.
    model = setup.load_model(cfg, torch.device("cpu") if cfg.fsdp else d.device)
    if cfg.max_length > model.config.text_config.max_position_embeddings:
        raise TrainConfigError(f"max_length={cfg.max_length} exceeds the model's "
                               f"{model.config.text_config.max_position_embeddings} positions")
    reference = None
    if cfg.stage == "dpo" and cfg.dpo_reference == "copy" and not cfg.lora:
        reference = copy.deepcopy(model).eval().requires_grad_(False)  # the SFT model, frozen
        if cfg.fsdp:
            fsdp.shard(reference, cfg, d.device, d.world)
    targets = setup.prepare_trainable(model, cfg, upcast=not cfg.fsdp)
    if cfg.gradient_checkpointing:
        setup.enable_gradient_checkpointing(model, cfg)
    shape = memory.Shape.of(model)  # counted before sharding: whole tensors
    if cfg.fsdp:
        sharding = fsdp.shard(model, cfg, d.device, d.world)
        say(f"FSDP: {sharding['units']} units sharded over {d.world} rank(s)"
            + (", bf16 compute, float32 reduction and masters" if sharding["bf16"] else ", float32")
            + ("; the frozen audio tower whole on each rank" if not sharding["tower_sharded"] else "")
            + ("; shards offloaded to CPU" if sharding["offload"] else ""))
    _check_memory(cfg, d, shape, say, warn)
    model.train()
    tower_cache = None
    if cfg.freeze_audio_tower and cfg.audio_cache_gb > 0:
        tower_cache = TowerCache.install(model.audio_tower, int(cfg.audio_cache_gb * 2**30))
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    what = f"LoRA r={cfg.lora_r} on {len(targets)} layers" if cfg.lora else ", ".join(setup.trainable_parts(cfg))
    say(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {n_trainable:,} trainable ({what})")
    optimizer = setup.build_optimizer(model, cfg)
    autocast = setup.autocast(cfg, d.device)
    if cfg.fsdp:
        autocast = contextlib.nullcontext  # FSDP's mixed-precision policy computes in bf16 (or float32)

    # ---- resume -------------------------------------------------------------------------------
    step, tables = 0, None
    if resume_from is not None:
        step, tables = _restore(resume_from, cfg, d, model, optimizer, names, stream)
        say(f"resumed from {resume_from} at step {step} (epoch {stream.epoch}, micro-batch {stream.offset})")

    # ---- objective ----------------------------------------------------------------------------
    if cfg.stage == "dpo":
        if cfg.dpo_reference == "precompute" and tables is None:
            tables = {"train": _reference_table(model, train_set, collate, cfg, d, autocast)}
            if eval_set is not None:
                tables["eval"] = _reference_table(model, eval_set, eval_collate, cfg, d, autocast)
        objective = DPOObjective(d.device, cfg.beta, reference=reference,
                                 lora_base=model if cfg.lora and cfg.dpo_reference == "copy" else None, tables=tables,
                                 rpo_alpha=cfg.rpo_alpha)
    else:
        objective = LMObjective(d.device)
    audio_side = not (cfg.freeze_audio_tower and cfg.freeze_projector)
    text_only = any(not seq.windows for ex in train_set.examples for seq in ex.seqs)
    ddp = model if cfg.fsdp else distributed.wrap(model, d, find_unused=audio_side and text_only)
    params = [p for p in model.parameters() if p.requires_grad]

    # ---- the loop -----------------------------------------------------------------------------
    history: list[dict] = []
    if resume_from is not None and d.is_main:
        trim_metrics(out / "metrics.jsonl", step)
    metrics = (out / "metrics.jsonl").open("a" if resume_from else "w") if d.is_main else None
    bar = tqdm(total=total, initial=step, desc=f"{cfg.stage}", unit="step", dynamic_ncols=True,
               disable=not (d.is_main and cfg.progress), file=sys.stderr)
    finished, measured = True, False
    while step < total:
        started = time.perf_counter()
        lr = lr_at(step, cfg, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [stream.next() for _ in range(cfg.grad_accum)]
        # Normalise by the whole step's target count (tokens, or DPO pairs) over all ranks; DDP then
        # averages gradients over ranks, hence the factor world: the update equals one big batch's.
        step_count = d.sum([sum(objective.count(b) for b in micro)])[0]
        sums: dict[str, float] = {}
        for i, batch in enumerate(micro):
            with d.no_sync(ddp, sync=i == len(micro) - 1):
                with autocast():
                    loss_sum, stats = objective(ddp, batch)
                (loss_sum * (d.world / max(step_count, 1))).backward()
            stats["tokens"] = int(batch["attention_mask"].sum())
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        if cfg.fsdp and not measured:  # after the first step of this run: gradients and optimizer state exist
            _write_memory(out, cfg, d, model, optimizer, shape)
            measured = True
        optimizer.zero_grad(set_to_none=True)
        step += 1

        keys = sorted(sums)  # one all-reduce for every statistic of the step
        totals = dict(zip(keys, d.sum([sums[k] for k in keys])))
        elapsed = time.perf_counter() - started
        record = {"step": step, "epoch": round(stream.epoch + stream.offset / stream.per_epoch, 4), "lr": lr,
                  "grad_norm": fsdp.scalar(grad_norm), **_averages(totals, objective.count_key),
                  "tokens": int(totals["tokens"]), "tokens_per_s": totals["tokens"] / elapsed}
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if eval_set is not None and (step == total or (cfg.eval_every and step % cfg.eval_every == 0)):
            record.update(evaluate(model, objective, eval_set, eval_collate, cfg, d, autocast))
        if step % cfg.log_every == 0 or step == total or "eval_loss" in record:
            history.append(record)
            if metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if not cfg.progress:
                say(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))
        stop = cfg.stop_at_step and step == cfg.stop_at_step and step < total
        if (cfg.save_every and step % cfg.save_every == 0) or step == total or stop:
            path = _save(ckpt_root, step, cfg, d, model, optimizer, names, stream, total, tables)
            if path is not None:
                bar.write(f"checkpoint: {path}", file=sys.stderr)
        if stop:
            finished = False
            say(f"stopped after step {step} of {total} (stop_at_step); continue with --resume")
            break
    bar.close()
    if metrics is not None:
        metrics.close()
    if tower_cache is not None and tower_cache.hits + tower_cache.misses:
        say(f"audio tower cache: {tower_cache.hits} of {tower_cache.hits + tower_cache.misses} windows reused, "
            f"{len(tower_cache.states)} kept ({tower_cache.bytes / 2**20:.0f} MiB)")

    # ---- the result ---------------------------------------------------------------------------
    if d.enabled and not cfg.fsdp:  # sharded: there are no replicas to compare
        in_sync = distributed.replicas_in_sync(model, d)
        say(f"replicas in sync: {'yes' if in_sync else 'NO'}")
        if not in_sync:
            raise RuntimeError("model replicas diverged across ranks")
    if finished and cfg.fsdp:  # every rank takes part in gathering, rank 0 writes
        fsdp.export(model, cfg, processor, d.is_main, d.comm_device, setup.export_dtype(cfg), say)
    elif finished and d.is_main:
        setup.export(model, cfg, processor, say)
    d.barrier()
    return TrainResult(out, step, finished, history, model)


def trim_metrics(path: Path, step: int) -> None:
    """Before a resumed run appends: keep the rows of steps up to the checkpoint's, once each, in order.
    A run stopped (or killed) after its last checkpoint logged steps the resumed run will log again."""
    if not path.is_file():
        return
    rows: dict[int, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill
        if isinstance(row_step, int) and row_step <= step:
            rows[row_step] = line  # a step logged twice (an older resume) keeps its latest row
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(rows[k] + "\n" for k in sorted(rows)), encoding="utf-8")
    os.replace(tmp, path)


# ---- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, objective, dataset, collate, cfg: TrainConfig, d, autocast) -> dict:
    """Held-out loss (and DPO reward metrics) over every rank's share, reduced to one number each."""
    model.eval()
    sums: dict[str, float] = {}
    for batch in eval_batches(dataset, collate, cfg.batch_size, d.rank, d.world):
        with autocast():
            _, stats = objective(model, batch)  # the bare model: no DDP hooks outside training
        for k, v in stats.items():
            sums[k] = sums.get(k, 0.0) + v
    for batch in _lockstep(dataset, collate, cfg, d):
        with autocast():
            objective(model, batch)  # only to take part in the sharded model's collectives
    model.train()
    keys = ["loss", objective.count_key] + sorted(k for k in (sums or {}) if k not in ("loss", objective.count_key))
    totals = dict(zip(keys, d.sum([sums.get(k, 0.0) for k in keys])))
    return {f"eval_{k}": v for k, v in _averages(totals, objective.count_key).items()}


def _lockstep(dataset, collate, cfg: TrainConfig, d) -> list[dict]:
    """Extra batches (results unused) for a rank with fewer held-out batches than another: a sharded
    model's forward is a collective that every rank must run as often."""
    if not cfg.fsdp:
        return []
    return [collate([dataset[0]])] * fsdp.lockstep_padding(len(dataset), cfg.batch_size, d.rank, d.world)


def _averages(totals: dict[str, float], count_key: str) -> dict[str, float]:
    n = max(totals.get(count_key, 0.0), 1.0)
    return {k: (v / n if k not in (count_key, "tokens") else int(v)) for k, v in totals.items() if k != "tokens"}


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- DPO reference log-probs -------------------------------------------------------------------
def _reference_table(model, dataset, collate, cfg, d, autocast) -> torch.Tensor:
    model.eval()
    batches = eval_batches(dataset, collate, cfg.batch_size, d.rank, d.world)
    part = precompute_reference(model, batches, d.device, len(dataset), autocast)
    with torch.no_grad():
        for batch in _lockstep(dataset, collate, cfg, d):
            logits_of(model, batch, d.device)
    model.train()
    summed = torch.tensor(d.sum(part.flatten().tolist()), dtype=torch.float64).view(part.shape)
    return (summed[:, :2] / summed[:, 2:].clamp(min=1)).float()


# ---- checkpoints -------------------------------------------------------------------------------
def _resume_path(cfg: TrainConfig, root: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        path = ckpt.latest_checkpoint(root)
        if path is None:
            raise ckpt.CheckpointError(f"--resume: no checkpoint in {root}")
        return path
    return Path(cfg.resume)


def _save(root, step, cfg, d, model, optimizer, names, stream, total, tables) -> Path | None:
    if cfg.fsdp:
        return _save_sharded(root, step, cfg, d, model, optimizer, stream, total, tables)
    rng = d.gather({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None})
    if not d.is_main:
        d.barrier()
        return None
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optim_tensors, optim_meta = ckpt.optimizer_to_tensors(optimizer, names)
    extra = {f"optim.{k}": v for k, v in optim_tensors.items()}
    extra.update(_rng_and_tables(rng, tables))
    epoch, offset = stream.position
    state = {"step": step, "total_steps": total, "epoch": epoch, "offset": offset, "world_size": d.world,
             "optimizer": optim_meta, "config": cfg.to_dict()}
    path = ckpt.save_checkpoint(root, step, trainable, extra, state, cfg.keep_last)
    d.barrier()
    return path


def _rng_and_tables(rng: list[dict], tables) -> dict[str, torch.Tensor]:
    """Every rank's RNG states (gathered) and the DPO reference tables, as checkpoint tensors."""
    extra = {}
    for rank, state in enumerate(rng):
        extra[f"rng.{rank}.cpu"] = state["cpu"]
        if state["cuda"] is not None:
            extra[f"rng.{rank}.cuda"] = state["cuda"]
    for split, table in (tables or {}).items():
        extra[f"reference.{split}"] = table
    return extra


def _save_sharded(root, step, cfg, d, model, optimizer, stream, total, tables) -> Path | None:
    """--fsdp: every rank writes its shard (DCP); rank 0 the RNG states of all ranks, DPO tables, state.json."""
    rng = d.gather({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(d.device) if d.device.type == "cuda" else None})
    extra = {}
    extra.update(_rng_and_tables(rng, tables))
    epoch, offset = stream.position
    state = {"step": step, "total_steps": total, "epoch": epoch, "offset": offset, "world_size": d.world,
             "config": cfg.to_dict()}
    path = fsdp.save(root, step, model, optimizer, extra, state, cfg.keep_last, d.is_main, d.gather)
    d.barrier()
    return path


def _load_trainable(model, c: ckpt.Checkpoint, what: str) -> None:
    """Copy a checkpoint's trainable weights into a model prepared (frozen parts, LoRA) like its run."""
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(c.trainable) != wanted:
        raise ckpt.CheckpointError(f"{what} {c.path}: its trainable weights do not match this model")
    with torch.no_grad():
        for name, tensor in c.trainable.items():
            params[name].copy_(tensor)


def _check_resume_settings(path, saved: dict, cfg: TrainConfig, skip: tuple[str, ...] = ()) -> None:
    defaults = TrainConfig().to_dict()  # a key newer than the checkpoint had its default then
    changed = [k for k in RESUME_INVARIANTS if k not in skip and saved.get(k, defaults[k]) != getattr(cfg, k)]
    if changed:
        raise TrainConfigError(f"--resume {path}: the run used other values of {', '.join(changed)} "
                               f"(e.g. {changed[0]}={saved.get(changed[0], defaults[changed[0]])!r}); "
                               "resume with the same settings")


def _restore(path, cfg, d, model, optimizer, names, stream):
    if ckpt.read_state(path)["format"] == ckpt.SHARDED_FORMAT:
        return _restore_sharded(path, cfg, d, model, optimizer, stream)
    if cfg.fsdp:
        raise TrainConfigError(f"--resume {path}: a checkpoint of a run without --fsdp; resume it without --fsdp")
    c = ckpt.load_checkpoint(path)
    saved = c.state["config"]
    _check_resume_settings(path, saved, cfg)
    if c.state["world_size"] != d.world:
        raise TrainConfigError(f"--resume {path}: saved with {c.state['world_size']} process(es), now {d.world}; "
                               "the data position is per process, so resume with the same count")
    _load_trainable(model, c, "--resume")
    optim = {k[len("optim."):]: v.to(d.device) for k, v in c.extra.items() if k.startswith("optim.")}
    for key, value in optim.items():
        if key.endswith("::step"):
            optim[key] = value.cpu()  # AdamW keeps its step count on the CPU
    ckpt.optimizer_from_tensors(optimizer, names, optim, c.state["optimizer"])
    torch.set_rng_state(c.extra[f"rng.{d.rank}.cpu"])
    if d.device.type == "cuda" and f"rng.{d.rank}.cuda" in c.extra:
        torch.cuda.set_rng_state(c.extra[f"rng.{d.rank}.cuda"], d.device)
    stream.epoch, stream.offset = c.state["epoch"], c.state["offset"]
    tables = {k.split(".", 1)[1]: v for k, v in c.extra.items() if k.startswith("reference.")} or None
    return c.state["step"], tables


def _restore_sharded(path, cfg, d, model, optimizer, stream):
    """A sharded checkpoint resumes on any number of ranks, with or without --fsdp, as long as the global
    batch (batch_size x grad_accum x ranks) is the run's: the data position is then the same examples."""
    state = ckpt.read_state(path)
    saved = state["config"]
    _check_resume_settings(path, saved, cfg, skip=("batch_size", "grad_accum"))
    old_world = state["world_size"]
    before = saved["batch_size"] * saved["grad_accum"] * old_world
    now = cfg.batch_size * cfg.grad_accum * d.world
    if before != now:
        raise TrainConfigError(f"--resume {path}: the run's global batch was {saved['batch_size']} x {saved['grad_accum']} "
                               f"x {old_world} process(es) = {before} {'pairs' if cfg.stage == 'dpo' else 'sequences'}, "
                               f"now {cfg.batch_size} x {cfg.grad_accum} x {d.world} = {now}; choose --batch-size and "
                               "--grad-accum to keep it")
    # Micro-step i of an epoch takes examples [i*B*W, (i+1)*B*W) of the epoch's order (data.shard_order).
    consumed = state["offset"] * saved["batch_size"] * old_world
    if consumed % (cfg.batch_size * d.world):
        raise TrainConfigError(f"--resume {path}: {consumed} examples into the epoch is not a whole number of "
                               f"micro-batches of {cfg.batch_size} x {d.world}; choose --batch-size to divide it")
    wanted = {n for n, p in model.named_parameters() if p.requires_grad}
    if fsdp.trainable_names(path) != wanted:
        raise ckpt.CheckpointError(f"--resume {path}: its trainable weights do not match this model")
    fsdp.load(path, model, optimizer)
    extra = ckpt.read_extra(path)
    if old_world == d.world:
        torch.set_rng_state(extra[f"rng.{d.rank}.cpu"])
        if d.device.type == "cuda" and f"rng.{d.rank}.cuda" in extra:
            torch.cuda.set_rng_state(extra[f"rng.{d.rank}.cuda"], d.device)
    else:  # other ranks: dropout masks cannot continue as they were; seeded from the step instead
        torch.manual_seed(cfg.seed + d.rank + 100_003 * state["step"])
    stream.epoch, stream.offset = state["epoch"], consumed // (cfg.batch_size * d.world)
    tables = {k.split(".", 1)[1]: v for k, v in extra.items() if k.startswith("reference.")} or None
    return state["step"], tables


def _check_memory(cfg: TrainConfig, d, shape: memory.Shape, say, warn) -> dict:
    """The memory plan of this run (the README's formula); a warning when it will not fit the GPU."""
    shards = d.world if cfg.fsdp else 1
    bf16 = fsdp.uses_bf16(cfg, d.device)
    rows = memory.plan(shape, shards, cfg.batch_size * cfg.max_length, bf16=bf16,
                       frozen_bytes=setup.DTYPES[cfg.model_dtype].itemsize, checkpointing=cfg.gradient_checkpointing,
                       offload=cfg.fsdp_cpu_offload)
    ok, total = memory.fits(rows, d.device)
    if cfg.fsdp or not ok:
        say(f"memory plan at {cfg.batch_size} x {cfg.max_length} tokens: {memory.describe(rows)}")
    if not ok:
        warn(f"warning: this run needs about {memory.gib(rows['device'] + memory.GPU_OVERHEAD)} GiB per GPU and "
             f"{torch.cuda.get_device_name(d.device)} has {memory.gib(total)} GiB: it will likely run out of memory. "
             "Shard it over more GPUs (--fsdp), offload (--fsdp-cpu-offload), train LoRA (--lora), "
             "or lower --batch-size / --max-length, or turn on --gradient-checkpointing")
    return rows


def _write_memory(out: Path, cfg: TrainConfig, d, model, optimizer, shape: memory.Shape) -> None:
    """OUTPUT/memory.json: the plan beside what each rank really holds after its first step."""
    import resource

    held = fsdp.held_bytes(model, optimizer)
    held["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if d.device.type == "cuda":
        held["cuda_peak"] = torch.cuda.max_memory_allocated(d.device)
    ranks = d.gather(held)
    if not d.is_main:
        return
    shards = d.world if cfg.fsdp else 1
    frozen_bytes = setup.DTYPES[cfg.model_dtype].itemsize
    rows = memory.plan(shape, shards, cfg.batch_size * cfg.max_length, bf16=fsdp.uses_bf16(cfg, d.device),
                       frozen_bytes=frozen_bytes, checkpointing=cfg.gradient_checkpointing, offload=cfg.fsdp_cpu_offload)
    report = {"world": d.world, "fsdp": cfg.fsdp, "shape": shape.__dict__, "plan": rows,
              "plan_sharded_state": memory.sharded_state(shape, shards, frozen_bytes), "ranks": ranks}
    (out / "memory.json").write_text(json.dumps(report, indent=2) + "\n")


def export_checkpoint(path: str | Path, output: str | Path, save_dtype: str | None = None, say=print) -> Path:
    """Write a step directory (OUTPUT/checkpoints/step-N) as an ordinary checkpoint directory, the way the
    run would have exported its model had it ended at that step: its base model (the run's `model`) with
    the saved trainable weights, LoRA merged (and the adapter written) as the run's config says."""
    state = ckpt.read_state(path)
    sharded = state["format"] == ckpt.SHARDED_FORMAT
    c = ckpt.Checkpoint(Path(path), {}, {}, state) if sharded else ckpt.load_checkpoint(path, extra=False)
    saved = {k: v for k, v in c.state["config"].items() if k in TrainConfig.field_names()}  # keys of any version
    cfg = TrainConfig(**{**saved, "output": str(output), "resume": None, "fsdp": False, "fsdp_cpu_offload": False})
    if save_dtype is not None:
        cfg.save_dtype = save_dtype
    cfg.validate()
    out = Path(output)
    if (out / "config.json").exists() or (out / "adapter").exists():
        raise TrainConfigError(f"{out} already holds a model: choose another --output")
    processor = Qwen2AudioProcessor.from_pretrained(check_directory(cfg.model))  # the run's base model is still there
    model = setup.load_model(cfg, torch.device("cpu"))
    setup.prepare_trainable(model, cfg)
    if sharded:  # read on this one process: DCP gathers each saved shard into the whole tensor
        if fsdp.trainable_names(path) != {n for n, p in model.named_parameters() if p.requires_grad}:
            raise ckpt.CheckpointError(f"export {path}: its trainable weights do not match this model")
        fsdp.load(Path(path), model)
    else:
        _load_trainable(model, c, "export")
    say(f"{c.path}: step {c.state['step']} of {c.state['total_steps']} ({cfg.stage}, from {cfg.model})")
    return setup.export(model, cfg, processor, say)


__all__ = ["TrainResult", "evaluate", "export_checkpoint", "lr_at", "train"]
