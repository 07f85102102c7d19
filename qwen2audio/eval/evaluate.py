"""One evaluation from start to report: read, shard, answer (resumably), gather, judge, score, report."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from ..errors import Qwen2AudioError
from . import runner
from .client import ChatClient
from .tasks import SCORERS, get_task


class UsageError(Qwen2AudioError):
    """Options that do not go together."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def shard_spec(shard: str | None) -> tuple[tuple[int, int], bool]:
    """((K, N), launched by torchrun?) from --shard K/N, else torchrun's RANK / WORLD_SIZE, else (0, 1)."""
    if shard:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not m or not int(m.group(1)) < int(m.group(2)):
            raise UsageError(f"--shard must be K/N with 0 <= K < N, got {shard!r}")
        return (int(m.group(1)), int(m.group(2))), False
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return (int(os.environ["RANK"]), world), True
    return (0, 1), False


def _barrier_group(hours: float):
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        # gloo works on every machine; only this barrier travels through it, never tensors.
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=hours))
    return dist


def _api_key(var: str | None) -> str | None:
    return os.environ.get(var) if var else None


def _endpoint_backend(args):
    from .backends import EndpointBackend

    client = ChatClient(args.endpoint, api_key=_api_key(args.endpoint_api_key_env), timeout=args.timeout,
                        retries=args.retries)
    model = args.endpoint_model or client.first_model()
    return EndpointBackend(client, model, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                           concurrency=args.batch_size, extra=_extra_sampling(args))


def _extra_sampling(args) -> dict:
    """The sampling flags beyond OpenAI's core ones, only when set: servers other than ours may refuse them, and
    runs made before these flags existed keep their settings (and so stay resumable)."""
    extra = {"top_k": args.top_k or None, "repetition_penalty": None if args.repetition_penalty == 1.0 else
             args.repetition_penalty, "stop": args.stop or None}
    return {k: v for k, v in extra.items() if v is not None}


def _local_backend(args, progress: bool):
    from .. import api
    from ..cli import resolve_device, sampling_params
    from .backends import LocalBackend

    sampling = sampling_params(args)  # checked before the model loads
    device = resolve_device(args.device)
    if device is None and "LOCAL_RANK" in os.environ:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    pipe = api.load(args.model, device=device, dtype=args.dtype, progress=progress, truncate=not args.full_audio,
                    quantize=getattr(args, "quantize", None))
    return LocalBackend(pipe, sampling)


def _settings(args, backend_id: dict) -> dict:
    return {"backend": backend_id, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "seed": args.seed, "full_audio": bool(args.full_audio and args.model),
            **_extra_sampling(args)}


def main(args) -> int:
    task = get_task(args.task)
    if args.merge:
        return merge_and_report(args, Path(args.merge))
    if not args.data or not args.output:
        raise UsageError("eval needs --data PATH and --output DIR (or --merge DIR)")
    from ..cli import sampling_params

    sampling_params(args)  # out-of-range sampling flags fail before any data is read or model loaded
    if args.model and args.endpoint:
        raise UsageError("eval takes one of --model DIR and --endpoint URL, not both")
    if not args.model and not args.endpoint:
        from ..bundle.assemble import default_model

        args.model = str(default_model())
    (k, n), torchrun = shard_spec(args.shard)
    progress = not args.no_progress and (k == 0 or not torchrun)  # one progress bar under torchrun
    dist = _barrier_group(args.barrier_timeout) if torchrun else None

    items = task.read(Path(args.data), Path(args.audio_root) if args.audio_root else None)
    if args.limit:
        items = items[: args.limit]
    if not items:
        raise UsageError(f"{args.data}: no items to evaluate")
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    backend = _endpoint_backend(args) if args.endpoint else None
    backend_id = backend.describe() if backend else {"kind": "model", "path": str(Path(args.model).resolve())}
    runner.check_manifest(out_dir, {
        "task": task.name, "data": str(Path(args.data).resolve()), "items": len(items),
        "data_digest": runner.data_digest(items), "limit": args.limit,
        "audio_root": str(Path(args.audio_root).resolve()) if args.audio_root else None,
        "settings": _settings(args, backend_id),
        "endpoint_url": backend.client.url if args.endpoint else None})
    if backend is None:
        backend = _local_backend(args, progress)

    stats = runner.generate(task.mode, items, backend, out_dir, batch_size=args.batch_size, shard=(k, n),
                            progress=progress, desc=f"{task.name} {k}/{n}" if n > 1 else task.name,
                            answer_fields=task.answer_fields)
    _say(f"{task.name}{f' shard {k}/{n}' if n > 1 else ''}: {stats['answered']} answered now, "
         f"{stats['already_answered']} already answered, {stats['audio_errors']} with unusable audio, "
         f"{stats['model_errors']} failed in the model")
    if torchrun:
        dist.barrier()
        if k != 0:
            dist.destroy_process_group()
            return 0
    try:
        return finish(args, task, items, out_dir, require_complete=n > 1 and not torchrun)
    finally:
        if torchrun:
            dist.destroy_process_group()


def merge_and_report(args, out_dir: Path) -> int:
    """--merge DIR: the items come from the data recorded in DIR/run.json (or --data)."""
    task = get_task(args.task)
    manifest = runner.read_manifest(out_dir)
    if manifest["task"] != task.name:
        raise UsageError(f"{out_dir} holds a {manifest['task']} run, not {task.name}")
    data = args.data or manifest["data"]
    audio_root = args.audio_root or manifest.get("audio_root")
    items = task.read(Path(data), Path(audio_root) if audio_root else None)
    if manifest.get("limit"):
        items = items[: manifest["limit"]]
    if runner.data_digest(items) != manifest["data_digest"]:
        raise UsageError(f"{data} no longer has the items of the run in {out_dir}")
    args.data = data
    return finish(args, task, items, out_dir, require_complete=False)


def finish(args, task, items, out_dir: Path, require_complete: bool) -> int:
    records, failed, missing = runner.merge(items, out_dir)
    if missing and require_complete:
        _say(f"{len(missing)} items are not answered yet (shards still running?); the last shard to finish "
             f"scores, or run: qwen2audio eval --task {task.name} --merge {out_dir}")
        return 0
    manifest = runner.read_manifest(out_dir)
    backend = dict(manifest["settings"]["backend"])
    if manifest.get("endpoint_url"):
        backend["url"] = manifest["endpoint_url"]
    summary = {"task": task.name, "data": manifest["data"], "backend": backend,
               "settings": manifest["settings"], "items": len(items), "answered": len(records),
               "audio_errors": sum(e.get("stage") != "model" for e in failed),
               "model_errors": sum(e.get("stage") == "model" for e in failed), "error_list": failed,
               "unanswered": len(missing),
               "strict": bool(getattr(args, "strict", False)), "metrics": None}
    if task.name == "airbench-chat":
        summary["metrics"], summary["note"] = _judge(args, records, out_dir)
    elif records:
        summary["metrics"] = SCORERS[task.name](records, language=args.language)
    if task.mode == "raw" and summary["backend"].get("kind") == "endpoint":
        summary["note"] = ("Answers came from a chat endpoint: the base-model prompt was sent as text after the audio "
                           "inside the chat template, which is not the paper's raw-prompt protocol.")
    from .report import write_reports

    write_reports(out_dir, summary)
    _say(f"wrote {out_dir / 'results.jsonl'}, {out_dir / 'summary.json'} and {out_dir / 'report.md'}")
    print((out_dir / "report.md").read_text(encoding="utf-8"))
    return 0


def _judge(args, records: list[dict], out_dir: Path):
    from .judge import chat_scores, load_judgments, run_judge

    if bool(args.judge_base_url) != bool(args.judge_model):
        raise UsageError("judging needs both --judge-base-url and --judge-model")
    if args.judge_base_url:
        client = ChatClient(args.judge_base_url, api_key=_api_key(args.judge_api_key_env), timeout=args.timeout,
                            retries=args.retries)
        judgments = run_judge(records, out_dir, client, args.judge_model, temperature=args.judge_temperature,
                              max_tokens=args.judge_max_tokens, concurrency=args.judge_concurrency,
                              progress=not args.no_progress)
        return chat_scores(records, judgments), None
    judgments = load_judgments(out_dir)
    note = ("No judge given (--judge-base-url, --judge-model): answers are saved; judge them later with "
            f"qwen2audio eval --task airbench-chat --merge {out_dir} --judge-base-url URL --judge-model NAME.")
    return (chat_scores(records, judgments) if judgments else None), note
