"""Benchmark readers -> Items: Qwen2-Audio eval JSONL, audio-qa JSONL, AIR-Bench folders, MMAU JSON.

An Item carries a stable key (for resuming and merging shards), the audio file to decode, and the
fields the official scorers read; the model's answer is added to those fields as ``response``.
Items whose audio file does not exist are still returned (``audio`` is the path that was looked
for): the runner reports them as missing instead of stopping the whole evaluation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..chat import AUDIO_BLOCK
from ..errors import Qwen2AudioError
from ..tokenizer import AUDIO


class DataError(Qwen2AudioError):
    """A benchmark file that cannot be read or lacks the fields its format needs."""


@dataclass
class Item:
    key: str
    index: int
    audio: str  # resolved path of the audio file
    fields: dict = field(default_factory=dict)  # copied into the output record
    text: str = ""  # raw prompt (base-model tasks) or user text (chat tasks)
    problem: str | None = None  # why the item cannot be evaluated although its audio may exist


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _require(obj, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")


def resolve_audio(name: str, *roots: Path | None) -> str:
    """The first existing candidate among root/name for each root (the first root when none exists)."""
    path = Path(os.path.expanduser(name))
    if path.is_absolute():
        return str(path)
    candidates = [Path(r) / path for r in roots if r is not None]
    for c in candidates:
        if c.exists():
            return str(c)
    return str(candidates[0] if candidates else path)


def with_other_extension(path: str) -> str:
    """AIR-Bench quirk: some meta entries say x.wav where the file is x.flac, or the reverse."""
    if os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    other = {".wav": ".flac", ".flac": ".wav"}.get(ext.lower())
    if other and os.path.exists(stem + other):
        return stem + other
    return path


# ---- JSONL benchmarks: Qwen2-Audio eval files (asr, s2tt, ser, vsc) and audio-qa ----------------
def _jsonl_rows(path: Path, fields: tuple[str, ...]):
    """(line number, row) for each non-empty line, each row checked for `fields`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        _require(row, fields, where)
        yield lineno, row


def read_qwen_jsonl(path: Path, audio_root: Path | None = None) -> list[Item]:
    """Lines like {"audio": path, "prompt": "...", "source": "librispeech_test_clean", "gt": "..."}.

    The official scripts prepend one <|audio_bos|><|AUDIO|><|audio_eos|> block to the prompt; a
    prompt that already contains the block is used as it is. Relative audio paths are looked up
    under --audio-root, then next to the JSONL file, then in the current directory.
    """
    path = Path(path)
    items = []
    for lineno, row in _jsonl_rows(path, ("audio", "prompt", "source", "gt")):
        prompt = row["prompt"] if AUDIO in row["prompt"] else AUDIO_BLOCK + row["prompt"]
        problem = None
        if prompt.count(AUDIO) != 1:
            problem = f"the prompt has {prompt.count(AUDIO)} {AUDIO} placeholders but the item has one audio"
        fields = {"gt": row["gt"], "source": row["source"], "audio_path": row["audio"], "prompt": row["prompt"]}
        extra = {k: v for k, v in row.items() if k not in fields and k != "audio"}
        audio = resolve_audio(row["audio"], audio_root, path.parent, Path.cwd())
        items.append(Item(str(lineno), len(items), audio, {**extra, **fields}, prompt, problem))
    return items


def read_qa_jsonl(path: Path, audio_root: Path | None = None) -> list[Item]:
    """Chat-mode questions about one audio: {"audio", "question", "gt", "source"} per line.

    An empty or missing "question" is voice chat: the user turn holds only the audio and the
    instruction is spoken in it. Audio paths resolve as for the Qwen2-Audio eval JSONL.
    """
    path = Path(path)
    items = []
    for lineno, row in _jsonl_rows(path, ("audio", "source", "gt")):
        question = row.get("question") or ""
        if not isinstance(question, str):
            raise DataError(f"{path}:{lineno}: 'question' must be a string")
        fields = {"gt": row["gt"], "source": row["source"], "audio_path": row["audio"], "question": question}
        extra = {k: v for k, v in row.items() if k not in fields and k != "audio"}
        audio = resolve_audio(row["audio"], audio_root, path.parent, Path.cwd())
        items.append(Item(str(lineno), len(items), audio, {**extra, **fields}, question))
    return items


# ---- AIR-Bench ---------------------------------------------------------------------------------
FOUNDATION_FIELDS = ("path", "question", "choice_a", "choice_b", "answer_gt", "task_name", "dataset_name", "uniq_id")
CHAT_FIELDS = ("path", "question", "answer_gt", "task_name", "dataset_name", "meta_info", "uniq_id")


def _airbench_meta(data: Path, part: str) -> Path:
    """Accept the meta JSON itself, the Foundation/ (Chat/) folder, or the AIR-Bench root above it."""
    data = Path(data)
    for candidate in (data, data / f"{part}_meta.json", data / part / f"{part}_meta.json"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{data}: no {part}_meta.json here, in it, or in {data / part}")


def read_airbench(data: Path, part: str, audio_root: Path | None = None) -> list[Item]:
    """AIR-Bench ``Foundation_meta.json`` / ``Chat_meta.json``; audio at {folder}/{task_name}_{dataset_name}/{path}."""
    from .choice import foundation_answer_letter, foundation_prompt

    meta = _airbench_meta(data, part)
    rows = _load_json(meta)
    if not isinstance(rows, list):
        raise DataError(f"{meta}: expected a JSON list of questions")
    root = Path(audio_root) if audio_root else meta.parent
    fields = FOUNDATION_FIELDS if part == "Foundation" else CHAT_FIELDS
    items, seen = [], set()
    for i, row in enumerate(rows):
        _require(row, fields, f"{meta} entry {i}")
        key = str(row["uniq_id"])
        if key in seen:
            raise DataError(f"{meta} entry {i}: uniq_id {key} appears twice")
        seen.add(key)
        audio = with_other_extension(str(root / f"{row['task_name']}_{row['dataset_name']}" / row["path"]))
        record = {k: row.get(k) for k in fields}
        if part == "Foundation":
            record.update(choice_c=row.get("choice_c"), choice_d=row.get("choice_d"))
            problem = None if foundation_answer_letter(record) else "answer_gt matches none of the choices"
            items.append(Item(key, i, audio, record, foundation_prompt(record), problem))
        else:
            items.append(Item(key, i, audio, record, row["question"]))
    return items


# ---- MMAU --------------------------------------------------------------------------------------
def read_mmau(path: Path, audio_root: Path | None = None) -> list[Item]:
    """MMAU test-mini / test JSON: a list of {"id", "audio_id", "question", "choices", "answer", "task", ...}."""
    from .choice import mmau_prompt

    path = Path(path)
    rows = _load_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of questions")
    items, seen = [], set()
    for i, row in enumerate(rows):
        _require(row, ("id", "audio_id", "question", "choices", "answer"), f"{path} entry {i}")
        if not isinstance(row["choices"], list) or not row["choices"]:
            raise DataError(f"{path} entry {i}: choices must be a non-empty list")
        key = str(row["id"])
        if key in seen:
            raise DataError(f"{path} entry {i}: id {key} appears twice")
        seen.add(key)
        audio = resolve_audio(row["audio_id"], audio_root, path.parent, Path.cwd())
        items.append(Item(key, i, audio, dict(row), mmau_prompt(row)))
    return items
