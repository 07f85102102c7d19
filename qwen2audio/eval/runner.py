"""The generation loop and the files of an evaluation folder.

An output folder holds, append-only, one JSON line per answered item in ``predictions.jsonl``
(``predictions.shard{K}of{N}.jsonl`` for shard K of N) and one per item whose audio could not be used
(or that the model failed on) in ``errors*.jsonl``. Lines are flushed and fsync'ed after every batch, so a crash loses at most the
batch in flight, and a rerun skips every item already answered in any part file (so it also resumes
after a change of sharding). ``run.json`` pins the task, data and generation settings of the folder,
so that answers made with different settings are never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import Qwen2AudioError
from .data import Item

MANIFEST = "run.json"
RESULTS = "results.jsonl"


class RunError(Qwen2AudioError):
    """An output folder that cannot be used for this run."""


# ---- JSONL files -------------------------------------------------------------------------------
def part_name(prefix: str, shard: tuple[int, int]) -> str:
    k, n = shard
    return f"{prefix}.jsonl" if n == 1 else f"{prefix}.shard{k}of{n}.jsonl"


def repair_tail(path: Path) -> None:
    """Cut a torn last line (a crash in the middle of a write) so that appends start on a new line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def append_lines(path: Path, rows: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line: that item is simply not done yet
    return rows


def _collect(out_dir: Path, prefix: str, first_wins: bool) -> dict[str, dict]:
    by_key: dict[str, dict] = {}
    for path in sorted(Path(out_dir).glob(f"{prefix}*.jsonl")):
        for row in read_jsonl(path):
            key = row.get("item_key")
            if key is not None and not (first_wins and key in by_key):
                by_key[key] = row
    return by_key


def answered(out_dir: Path) -> dict[str, dict]:
    """item_key -> prediction record, over every part file (the first answer wins on duplicates)."""
    return _collect(out_dir, "predictions", first_wins=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---- manifest ----------------------------------------------------------------------------------
def data_digest(items: list[Item]) -> str:
    return hashlib.sha256("\n".join(it.key for it in items).encode()).hexdigest()[:16]


def check_manifest(out_dir: Path, manifest: dict) -> dict:
    """Write run.json, after checking that answers already in the folder came from the same task,
    data and settings (a folder without answers yet may be reused with anything, e.g. after a typo)."""
    path = Path(out_dir) / MANIFEST
    if path.exists() and answered(out_dir):
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise RunError(f"{path}: not valid JSON; remove it or use another --output") from None
        for field in ("task", "items", "data_digest", "settings"):
            if old.get(field) != manifest.get(field):
                raise RunError(f"{out_dir} holds answers of a run with another {field} ({old.get(field)} vs "
                               f"{manifest.get(field)}); use another --output to keep both")
    write_atomic(path, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")  # e.g. a new endpoint URL
    return manifest


def read_manifest(out_dir: Path) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise RunError(f"{out_dir}: no {MANIFEST}; is this an evaluation output folder?")
    return json.loads(path.read_text(encoding="utf-8"))


# ---- generation --------------------------------------------------------------------------------
def _load(item: Item):
    """(waveform, None) or (None, reason): a missing or unreadable file is reported, not fatal."""
    from ..audio import load_audio

    if item.problem:
        return None, item.problem
    if not os.path.exists(item.audio):
        return None, "file not found"
    try:
        return load_audio(item.audio, name=item.audio), None
    except Qwen2AudioError as e:  # AudioError
        return None, str(e).removeprefix(f"{item.audio}: ")


def _answers(backend, mode: str, requests: list) -> list:
    """One answer per request, or the user-facing error (Qwen2AudioError) that request alone raises.

    When a batch fails on its content (such as a prompt too long for the model), each
    item is tried alone, so that one bad item is reported instead of stopping every rerun at the
    same place. Failures of the machinery itself (a server that is down) are raised.
    """
    try:
        return backend.generate(mode, requests)
    except Qwen2AudioError as e:
        if getattr(e, "fatal", False):
            raise
        if len(requests) == 1:
            return [e]
    out = []
    for request in requests:
        try:
            out += backend.generate(mode, [request])
        except Qwen2AudioError as e:
            if getattr(e, "fatal", False):
                raise
            out.append(e)
    return out


def generate(mode: str, items: list[Item], backend, out_dir: Path, *, batch_size: int = 8,
             shard: tuple[int, int] = (0, 1), progress: bool = True, desc: str = "eval",
             answer_fields: tuple[str, ...] = ("response",)) -> dict:
    """Answer this shard's unanswered items batch by batch, appending to its part files."""
    from tqdm import tqdm

    k, n = shard
    out_dir = Path(out_dir)
    mine = [it for it in items if it.index % n == k]
    done = answered(out_dir)
    todo = [it for it in mine if it.key not in done]
    pred_path, err_path = out_dir / part_name("predictions", shard), out_dir / part_name("errors", shard)
    repair_tail(pred_path)
    repair_tail(err_path)
    stats = {"assigned": len(mine), "already_answered": len(mine) - len(todo), "answered": 0, "audio_errors": 0,
             "model_errors": 0, "batches": 0}
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc, unit="item", disable=not progress)
    with ThreadPoolExecutor(4) as loader:
        # Decode the next batch's audio while the model answers the current one.
        pending = loader.map(_load, batches[0]) if batches else None
        for b, batch in enumerate(batches):
            loaded = list(pending)
            if b + 1 < len(batches):
                pending = loader.map(_load, batches[b + 1])
            ok = [(it, wav) for it, (wav, _) in zip(batch, loaded) if wav is not None]
            errors = [{"item_key": it.key, "audio": it.audio, "stage": "audio", "reason": why}
                      for it, (_, why) in zip(batch, loaded) if why is not None]
            stats["audio_errors"] += len(errors)
            if ok:
                answers = _answers(backend, mode, [(it.text, wav) for it, wav in ok])
                stats["batches"] += 1
                done_now = [(it, a) for (it, _), a in zip(ok, answers) if isinstance(a, str)]
                failed = [{"item_key": it.key, "audio": it.audio, "stage": "model", "reason": str(a)}
                          for (it, _), a in zip(ok, answers) if not isinstance(a, str)]
                errors += failed
                stats["model_errors"] += len(failed)
                if done_now:
                    append_lines(pred_path, [{**it.fields, "item_key": it.key, **dict.fromkeys(answer_fields, a)}
                                             for it, a in done_now])
                stats["answered"] += len(done_now)
            if errors:
                append_lines(err_path, errors)
            bar.update(len(batch))
    bar.close()
    return stats


def merge(items: list[Item], out_dir: Path) -> tuple[list[dict], list[dict], list[str]]:
    """(records in dataset order, errors of unanswered items, keys with neither) over all part files."""
    done = answered(out_dir)
    errors = _collect(out_dir, "errors", first_wins=False)  # the latest reason
    records = [done[it.key] for it in items if it.key in done]
    failed = [errors[it.key] for it in items if it.key not in done and it.key in errors]
    missing = [it.key for it in items if it.key not in done and it.key not in errors]
    write_atomic(Path(out_dir) / RESULTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records, failed, missing
