"""JSONL training records -> validated, tokenized examples with per-token labels.

Accepted shapes (one JSON object per line; audio paths are relative to the JSONL file's folder):

    sft:      {"messages": [{"role": "user", "content": "<audio>What's that sound?"},
                            {"role": "assistant", "content": "A dog barking."}], "audios": ["dog.wav"]}
              or the same messages with structured parts: {"type": "audio", "audio": "dog.wav"}, {"type": "text", ...}
    dpo:      the sft shape + "rejected_response": "..." (replaces the last, assistant, message)
    pretrain: task records, see pretrain_tasks.py

Every bad record is reported as `file:line: reason`; sequences longer than max_length are dropped or
cut, but never inside an audio block, so audio tokens and audio features always match.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ..audio import AudioError, load_audio
from ..chat import MessageError, render_chat
from ..errors import Qwen2AudioError
from ..features import num_audio_tokens, num_valid_frames, split_windows
from ..tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, ENDOFTEXT, IM_END, Tokenizer
from .pretrain_tasks import TaskError, example_from_record

IGNORE = -100  # label of tokens that are not trained (prompt, audio, system/user turns, padding)
TAG = "<audio>"  # ms-swift's audio placeholder in message text
RESERVED = (AUDIO, AUDIO_BOS, AUDIO_EOS)


class RecordError(Qwen2AudioError):
    """One record's problem (reported with its file:line)."""


class DataError(Qwen2AudioError):
    """A data file that cannot be used; `problems` lists every bad record as `file:line: reason`."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


@dataclass
class Sequence:
    ids: list[int]
    labels: list[int]  # IGNORE where not trained
    windows: list[tuple[str, int]]  # (audio path, 30 s window index), one per audio block, in order

    @property
    def n_target(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class Example:
    where: str  # file:line
    seqs: list[Sequence]  # [sequence] for pretrain/sft, [chosen, rejected] for dpo


@dataclass
class LoadReport:
    examples: list[Example]
    problems: list[str] = field(default_factory=list)
    dropped: int = 0  # longer than max_length and dropped
    cut: int = 0  # longer than max_length and cut


# ---- reading -----------------------------------------------------------------------------------
def read_jsonl(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, record or None, problem or None) for every non-blank line."""
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, f"not valid JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(obj, dict):
                yield lineno, None, f"expected a JSON object, got {type(obj).__name__}"
                continue
            yield lineno, obj, None


def _check_text(text: str, where: str) -> None:
    for token in RESERVED:
        if token in text:
            raise RecordError(f"{where} contains the reserved token {token}; mark audio with {TAG} tags or audio parts")


def _resolve(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def check_role_order(messages: list) -> None:
    """An optional system message first, then user and assistant turns alternating, a user turn first:
    the order the chat template and the model were trained on. Anything else is a data mistake (a
    shifted or merged conversation) that would train the model on the wrong speaker."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RecordError(f"message {i}: needs a role among system, user, assistant")
    first = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[first:], first):
        role, previous = m["role"], messages[i - 1]["role"] if i else None
        if role == "system":
            raise RecordError(f"message {i}: a system message may only come first")
        if i == first and role != "user":
            raise RecordError(f"message {i}: the conversation must start with a user turn"
                              + (" after the system message" if first else "") + f", not {role}")
        if role == previous:
            raise RecordError(f"message {i}: two {role} turns in a row (user and assistant turns must alternate)")


def normalize_messages(record: dict, base: Path) -> list[dict]:
    """ms-swift tags or structured parts -> messages whose contents are lists of parts with resolved paths."""
    messages = record.get("messages")
    if messages is None:
        raise RecordError("missing 'messages'")
    if not isinstance(messages, list) or not messages:
        raise RecordError("'messages' must be a non-empty list")
    audios = record.get("audios", record.get("audio", []))
    if isinstance(audios, str):
        audios = [audios]
    if not isinstance(audios, list) or not all(isinstance(a, str) and a for a in audios):
        raise RecordError("'audios' must be a list of file paths")
    check_role_order(messages)
    tags = 0
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise RecordError(f"message {i}: content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise RecordError(f"message {i} part {j}: expected an object")
            if part.get("type") == "audio" or "audio" in part:
                if not isinstance(part.get("audio"), str) or not part["audio"]:
                    raise RecordError(f"message {i} part {j}: an audio part needs a file path in 'audio'")
                parts.append({"type": "audio", "audio": _resolve(part["audio"], base)})
            elif isinstance(part.get("text"), str):
                _check_text(part["text"], f"message {i}")
                pieces = part["text"].split(TAG)
                for k, piece in enumerate(pieces):  # each <audio> tag takes the next entry of "audios"
                    if k:
                        parts.append({"type": "audio", "audio": _resolve(audios[tags], base) if tags < len(audios) else ""})
                        tags += 1
                    if piece:
                        parts.append({"type": "text", "text": piece})
            else:
                raise RecordError(f"message {i} part {j}: neither text nor audio")
        if m["role"] == "assistant" and any(p["type"] == "audio" for p in parts):
            raise RecordError(f"message {i}: an assistant turn cannot contain audio")
        out.append({"role": m["role"], "content": parts})
    if tags != len(audios):
        raise RecordError(f"{tags} {TAG} tag(s) in the messages but {len(audios)} file(s) in 'audios'")
    return out


def _assistant_text(message: dict) -> str:
    return "".join(p["text"] for p in message["content"])


def chat_segments(messages: list[dict], train_last_only: bool = False) -> tuple[list[tuple[str, bool]], list[str]]:
    """The rendered conversation cut into (text, trained) pieces: assistant contents + <|im_end|> are trained."""
    assistants = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistants:
        raise RecordError("no assistant turn to train on")
    if train_last_only:
        assistants = assistants[-1:]
    full, sources = render_chat(messages, add_generation_prompt=False)
    spans = []
    for k in assistants:
        text = _assistant_text(messages[k])
        if not text.strip():
            raise RecordError(f"message {k}: empty assistant turn")
        # Prefix renderings are prefixes of the full one: turn k ends with "<|im_end|>\n".
        end = len(render_chat(messages[: k + 1], add_generation_prompt=False)[0]) - 1
        spans.append((end - len(IM_END) - len(text), end))
    segments, pos = [], 0
    for start, end in spans:
        segments += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    segments.append((full[pos:], False))
    return [s for s in segments if s[0]], sources


# ---- tokens ------------------------------------------------------------------------------------
class AudioProbe:
    """Decodes each file once to learn its audio-token counts per 30 s window (errors are cached too)."""

    def __init__(self, load: Callable = load_audio):
        self.load = load
        self.known: dict[str, list[int] | str] = {}

    def counts(self, path: str) -> list[int]:
        if path not in self.known:
            try:
                windows = split_windows(self.load(path))
                counts = [num_audio_tokens(num_valid_frames(len(w))) for w in windows]
                self.known[path] = counts if min(counts) > 0 else f"audio {path}: too short to give any audio token"
            except AudioError as e:
                self.known[path] = f"unreadable audio: {e}"
        result = self.known[path]
        if isinstance(result, str):
            raise RecordError(result)
        return result


def tokenize(segments: list[tuple[str, bool]], sources: list[str], tok: Tokenizer, probe: AudioProbe) -> Sequence:
    """Tokenize piece by piece (labels follow the pieces), then expand each <|AUDIO|> to its windows' tokens."""
    counts = [probe.counts(s) for s in sources]
    ids, labels, windows = [], [], []
    clip = 0
    for text, trained in segments:
        for t in tok.encode(text):
            if t != tok.audio_id:
                ids.append(t)
                labels.append(t if trained else IGNORE)
                continue
            # Same expansion as the processor: windows joined by <|audio_eos|><|audio_bos|>.
            for w, n in enumerate(counts[clip]):
                if w:
                    ids += [tok.audio_eos_id, tok.audio_bos_id]
                    labels += [IGNORE, IGNORE]
                ids += [tok.audio_id] * n
                labels += [IGNORE] * n
                windows.append((sources[clip], w))
            clip += 1
    if clip != len(sources):
        raise RecordError(f"{len(sources)} audio(s) but {clip} audio placeholder(s) after tokenization")
    return Sequence(ids, labels, windows)


def fit(seq: Sequence, max_length: int, truncation: str, tok: Tokenizer) -> Sequence | None:
    """`seq` if it fits; else None (drop) or a cut copy whose end never falls inside an audio block."""
    if len(seq.ids) <= max_length:
        return seq
    if truncation == "drop":
        return None
    cut, kept = max_length, 0
    starts = [i for i, t in enumerate(seq.ids) if t == tok.audio_bos_id]
    ends = [i for i, t in enumerate(seq.ids) if t == tok.audio_eos_id]
    for start, end in zip(starts, ends):  # one <|audio_bos|> ... <|audio_eos|> block per window
        if end < cut:
            kept += 1
            continue
        cut = min(cut, start)  # the block would be split: cut before it
        break
    out = Sequence(seq.ids[:cut], seq.labels[:cut], seq.windows[:kept])
    return out if out.n_target else None


def check_audio_tokens(seq: Sequence, probe: AudioProbe, tok: Tokenizer, where: str) -> None:
    """The invariant the model relies on: <|AUDIO|> tokens == the audio embeddings of the kept windows."""
    expected = sum(probe.counts(path)[w] for path, w in seq.windows)
    found = sum(1 for t in seq.ids if t == tok.audio_id)
    if expected != found:  # a bug, never a user error: fail loudly
        raise AssertionError(f"{where}: {found} <|AUDIO|> tokens but {expected} audio embeddings")


# ---- records -> examples -----------------------------------------------------------------------
def record_to_sequences(record: dict, stage: str, base: Path, tok: Tokenizer, probe: AudioProbe) -> list[Sequence]:
    # SFT also takes task records, so that pre-training examples mixed into SFT data keep the base
    # model's raw-prompt abilities (replay) instead of being forgotten.
    if stage == "pretrain" or (stage == "sft" and "task" in record and "messages" not in record):
        if "messages" in record:
            raise RecordError("--stage pretrain reads task records ({\"task\", \"audio\", \"label\", ...}), not messages")
        ex = example_from_record(record)
        for key in ("label", "prompt"):
            if isinstance(record.get(key), str):
                _check_text(record[key], f"'{key}'")
        segments = [(ex["prompt"], False), (ex["target"] + ENDOFTEXT, True)]
        return [tokenize(segments, [_resolve(a, base) for a in ex["audios"]], tok, probe)]
    messages = normalize_messages(record, base)
    if stage == "sft":
        segments, sources = chat_segments(messages)
        return [tokenize(segments, sources, tok, probe)]
    rejected = record.get("rejected_response")
    if rejected is None:
        raise RecordError("missing 'rejected_response' (needed by --stage dpo)")
    if not isinstance(rejected, str) or not rejected.strip():
        raise RecordError("'rejected_response' must be a non-empty string")
    _check_text(rejected, "'rejected_response'")
    if messages[-1]["role"] != "assistant":
        raise RecordError("the last message must be the assistant's (chosen) answer")
    if _assistant_text(messages[-1]) == rejected:
        raise RecordError("'rejected_response' equals the chosen answer")
    other = messages[:-1] + [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}]
    out = []
    for conversation in (messages, other):  # only the last turn differs, and only it is scored
        segments, sources = chat_segments(conversation, train_last_only=True)
        out.append(tokenize(segments, sources, tok, probe))
    return out


def load_examples(path: str | Path, stage: str, tok: Tokenizer, max_length: int, truncation: str = "drop",
                  skip_bad_records: bool = False, log: Callable[[str], None] | None = print,
                  probe: AudioProbe | None = None) -> LoadReport:
    """Read and check every record; report bad ones as `file:line: reason` (fail unless skipping)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    log = log or (lambda _: None)
    probe = probe or AudioProbe()
    report = LoadReport([])
    for lineno, record, problem in read_jsonl(path):
        where = f"{path}:{lineno}"
        try:
            if problem:
                raise RecordError(problem)
            seqs = record_to_sequences(record, stage, path.parent.resolve(), tok, probe)
        except (RecordError, TaskError, MessageError, AudioError) as e:
            report.problems.append(f"{where}: {' '.join(str(e).split())}")
            continue
        fitted = [fit(s, max_length, truncation, tok) for s in seqs]
        if any(s is None for s in fitted):
            report.dropped += 1
            continue
        report.cut += any(a is not b for a, b in zip(fitted, seqs))
        for s in fitted:
            check_audio_tokens(s, probe, tok, where)
        report.examples.append(Example(where, fitted))
    if report.problems:
        for line in report.problems:
            log(line)
        if not skip_bad_records:
            raise DataError(f"{path}: {len(report.problems)} bad record(s), first: {report.problems[0]} "
                            "(fix them or pass --skip-bad-records)", report.problems)
        log(f"{path}: skipped {len(report.problems)} bad record(s)")
    if report.dropped:
        log(f"{path}: dropped {report.dropped} record(s) longer than max_length={max_length}")
    if report.cut:
        log(f"{path}: cut {report.cut} record(s) to max_length={max_length} (never inside an audio block)")
    if not report.examples:
        raise DataError(f"{path}: no usable records")
    return report


__all__ = ["DataError", "Example", "IGNORE", "LoadReport", "Sequence", "load_examples", "chat_segments", "fit"]
