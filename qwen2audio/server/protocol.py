"""The OpenAI chat-completions request, checked field by field, and the response shapes.

Bodies are parsed by hand rather than by pydantic models so that every mistake is answered with
OpenAI's error shape and a message naming the field (`messages[1].content[0].input_audio.data`).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
import zlib
from dataclasses import dataclass, field

from ..engine.sampling import MAX_LOGPROBS, REPETITION_PENALTY_RANGE, SamplingParams
from .errors import APIError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
AUDIO_TYPES = ("input_audio", "audio_url")
MAX_STOP_STRINGS = 8
# Fields of OpenAI's API this server cannot honour: refused instead of silently ignored.
UNSUPPORTED = {
    "tools": lambda v: bool(v), "functions": lambda v: bool(v), "tool_choice": lambda v: v not in (None, "none"),
    "presence_penalty": lambda v: v not in (None, 0, 0.0), "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "logit_bias": lambda v: bool(v), "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
    "response_format": lambda v: v not in (None, {"type": "text"}),
}

# Every other field the chat endpoint takes: OpenAI's that it honours or that are bookkeeping for OpenAI's own
# platform (user, metadata, store, ...: accepted and ignored), and its extensions. Any other name, vLLM's min_p or
# use_beam_search or a misspelling, is refused, never silently ignored.
CHAT_FIELDS = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
               "stream_options", "stop", "seed", "logprobs", "top_logprobs", "user", "metadata", "store",
               "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier",
               "top_k", "repetition_penalty", "ignore_eos", *UNSUPPORTED}


@dataclass
class ChatRequest:
    messages: list[dict]  # validated; audio parts still hold their sources
    audio_parts: list[tuple[str, dict]]  # (param path, part) in prompt order
    params: SamplingParams
    max_tokens: int | None  # None: as many as fit
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    extra: dict = field(default_factory=dict)


def parse_json(body: bytes) -> dict:
    if not body:
        raise APIError(400, "the request body is empty; send a JSON object", "invalid_json")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})", "invalid_json") from None
    except RecursionError:  # e.g. [[[[...]]]] 100,000 deep: the parser recurses once per level
        raise APIError(400, "the request body nests JSON arrays or objects too deeply", "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    return data


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if ok and not integer:
        try:  # an integer of 400 digits is valid JSON but no float
            ok = math.isfinite(float(value))
        except OverflowError:
            ok = False
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{name} must be {kind}, got {json.dumps(value)[:40]}", "invalid_value", name)
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    if too_low or (hi is not None and value > hi):
        low = "-inf" if lo is None else lo
        bounds = f"{'(' if lo_open else '['}{low}, {hi if hi is not None else 'inf'}]"
        raise APIError(400, f"{name} must be in {bounds}, got {value}", "invalid_value", name)
    return value


def parse_messages(messages) -> tuple[list[dict], list[tuple[str, dict]]]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "invalid_messages", "messages")
    out, audio = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object with role and content", "invalid_messages", where)
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"{where}.role {json.dumps(role)[:40]} is not supported; use system, user or "
                                f"assistant", "invalid_role", f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            out.append({"role": ROLES[role], "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or a list of content parts",
                           "invalid_messages", f"{where}.content")
        parts = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"{pwhere}.text must be a string", "invalid_content", f"{pwhere}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind in AUDIO_TYPES:
                if role == "assistant":
                    raise APIError(400, f"{pwhere}: audio is only accepted in user or system messages",
                                   "invalid_content", pwhere)
                parts.append(part)
                audio.append((pwhere, part))
            else:
                raise APIError(400, f"{pwhere}: unsupported content part type {json.dumps(kind)[:40]}; this model "
                                    f"takes 'text', 'input_audio' and 'audio_url' parts", "invalid_content", pwhere)
        out.append({"role": ROLES[role], "content": parts})
    return out, audio


def parse_chat_request(body: dict) -> ChatRequest:
    for name, value in body.items():
        if name not in CHAT_FIELDS and value is not None:
            raise APIError(400, f"{str(name)[:40]!r} is not supported by /v1/chat/completions (this server takes "
                                f"OpenAI's fields and top_k, repetition_penalty, ignore_eos)", "unsupported_parameter",
                           str(name)[:40])
    for name, refused in UNSUPPORTED.items():
        if name in body and refused(body[name]):
            raise APIError(400, f"{name} is not supported by this server", "unsupported_parameter", name)
    n = _number(body, "n", 1, integer=True)
    if n != 1:
        raise APIError(400, f"n={n} is not supported: this server returns one choice per request (n=1)",
                       "unsupported_parameter", "n")
    messages, audio = parse_messages(body.get("messages"))
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, None, lo=1, integer=True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} such strings",
                       "invalid_value", "stop")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "invalid_value", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "stream_options must be an object", "invalid_value", "stream_options")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise APIError(400, "ignore_eos must be true or false", "invalid_value", "ignore_eos")
    top_k = _number(body, "top_k", 0, lo=-1, integer=True)
    logprobs = body.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise APIError(400, "logprobs must be true or false", "invalid_value", "logprobs")
    top_logprobs = _number(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS, integer=True)
    if top_logprobs is not None and not logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "invalid_value", "top_logprobs")
    penalty_lo, penalty_hi = REPETITION_PENALTY_RANGE
    # Every value is range-checked here so the message names the request's field; SamplingParams checks again.
    params = SamplingParams(
        max_new_tokens=max_tokens or 1,  # replaced once the prompt length is known
        temperature=float(_number(body, "temperature", 1.0, lo=0, hi=2)),  # OpenAI's default is 1
        top_p=float(_number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)),
        top_k=max(0, top_k),  # -1 means off, as in vLLM
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, lo=penalty_lo, hi=penalty_hi)),
        seed=_number(body, "seed", None, lo=-(2**63), hi=2**63 - 1, integer=True),  # int64, as torch takes it
        stop=stop,
        logprobs=(top_logprobs or 0) if logprobs else None,
    )
    return ChatRequest(messages, audio, params, max_tokens, stream, bool(options.get("include_usage")), ignore_eos)


# ---- /v1/audio/transcriptions and /v1/audio/translations (multipart forms) -------------------------
# OpenAI's fields plus the sampling extensions the chat endpoint takes (vLLM's names). Any other field, vLLM's
# `use_beam_search`, `n`, `min_p`, `stream_include_usage`... or a misspelling, is refused, never silently ignored.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "max_completion_tokens")
SPEECH_FIELDS = {
    "transcriptions": {"file", "model", "language", "prompt", "response_format", "stream", "timestamp_granularities[]",
                       *SAMPLING_FIELDS},
    # `language` (the speech's, detected when absent) and `to_language` (default en) as vLLM names them
    "translations": {"file", "model", "language", "to_language", "prompt", "response_format", *SAMPLING_FIELDS},
}
SPEECH_FORMATS = {"transcriptions": ("json", "text", "verbose_json"), "translations": ("json", "text")}


@dataclass
class SpeechRequest:
    upload: object  # starlette UploadFile
    language: str | None  # of the speech; None: detected
    to_language: str | None  # translations only
    format: str
    stream: bool
    params: SamplingParams
    max_tokens: int | None  # None: the server's default for the endpoint


def form_text(form, name: str) -> str | None:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise APIError(400, f"form field {name!r} must be text, not a file", "invalid_value", name)
    return value or None


def _form_number(form, name: str, default, integer=False, **bounds):
    text = form_text(form, name)
    if text is None:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        raise APIError(400, f"{name} must be {'an integer' if integer else 'a number'}, got {text[:40]!r}",
                       "invalid_value", name) from None
    return _number({name: value}, name, default, integer=integer, **bounds)


def _language(form, name: str, languages) -> str | None:
    code = form_text(form, name)
    if code is not None and code not in languages:
        what = "one this model transcribes" if name == "language" else "a language this model translates into"
        raise APIError(400, f"{name} {code[:20]!r} is not {what}; use one of {', '.join(languages)}"
                            + (", or leave it out to have it detected" if name == "language" else ""),
                       "invalid_value", name)
    return code


def parse_speech_form(form, endpoint: str, languages) -> SpeechRequest:
    """The checked fields of a transcription or translation form (`form.get("model")` is checked by the caller)."""
    fields = SPEECH_FIELDS[endpoint]
    for name in form.keys():
        if name not in fields:
            raise APIError(400, f"{name!r} is not supported by /v1/audio/{endpoint}; it takes "
                                f"{', '.join(sorted(fields))}", "unsupported_parameter", name)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "send the audio as a multipart/form-data upload in the field 'file'",
                       "missing_file", "file")
    fmt = form_text(form, "response_format") or "json"
    if fmt not in SPEECH_FORMATS[endpoint]:
        raise APIError(400, f"response_format {fmt!r} is not supported; use {', '.join(SPEECH_FORMATS[endpoint])} (this "
                            f"model gives no timestamps for srt or vtt)", "unsupported_parameter", "response_format")
    stream = (form_text(form, "stream") or "false").lower()
    if stream not in ("true", "false"):
        raise APIError(400, "stream must be true or false", "invalid_value", "stream")
    if stream == "true" and fmt == "verbose_json":
        raise APIError(400, "stream=true gives text events; ask for json or text with it, not verbose_json",
                       "unsupported_parameter", "response_format")
    granularities = form.getlist("timestamp_granularities[]")
    if any(g != "segment" for g in granularities) or (granularities and fmt != "verbose_json"):
        raise APIError(400, "timestamp_granularities[] takes only 'segment' (one per 30 s window; this model gives no "
                            "word timestamps), with response_format verbose_json", "unsupported_parameter",
                       "timestamp_granularities[]")
    temperature = _form_number(form, "temperature", 0.0, lo=0, hi=2)  # OpenAI's default for speech is 0
    penalty_lo, penalty_hi = REPETITION_PENALTY_RANGE
    params = SamplingParams(
        temperature=float(temperature),
        top_p=float(_form_number(form, "top_p", 1.0, lo=0, hi=1, lo_open=True)),
        top_k=max(0, _form_number(form, "top_k", 0, integer=True, lo=-1)),
        repetition_penalty=float(_form_number(form, "repetition_penalty", 1.0, lo=penalty_lo, hi=penalty_hi)),
        seed=_form_number(form, "seed", None, integer=True, lo=-(2**63), hi=2**63 - 1),
        # verbose_json segments carry avg_logprob: ask the engine for each token's log-probability
        logprobs=0 if fmt == "verbose_json" else None,
    )
    return SpeechRequest(upload, _language(form, "language", languages),
                         _language(form, "to_language", languages) if endpoint == "translations" else None,
                         fmt, stream == "true", params,
                         _form_number(form, "max_completion_tokens", None, integer=True, lo=1))


def speech_usage(prompt_tokens: int, output_tokens: int, seconds: float) -> dict:
    """OpenAI's token usage, plus the audio's `seconds` (rounded up, as vLLM and OpenAI's duration usage give it)."""
    return {"type": "tokens", "input_tokens": prompt_tokens, "output_tokens": output_tokens,
            "total_tokens": prompt_tokens + output_tokens, "seconds": math.ceil(seconds)}


# ---- responses ----------------------------------------------------------------------------------
def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(rid: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None,
          usage_: dict | None = None, include_usage: bool = False, logprobs: dict | None = None) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": logprobs,
                                                 "finish_reason": finish_reason}]}
    if include_usage:
        out["usage"] = usage_
    return out


def sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _token_logprob(tokenizer, token_id: int, logprob: float) -> dict:
    raw = tokenizer.token_bytes(token_id)
    # -inf (a token the distribution rules out) is not JSON: OpenAI's clients expect a number
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, -9999.0), "bytes": list(raw)}


def chat_logprobs(tokenizer, outputs) -> dict:
    """OpenAI's choice.logprobs for the tokens of some engine Outputs: {"content": [{token, logprob, bytes,
    top_logprobs: [{token, logprob, bytes}, ...]}, ...], "refusal": None}."""
    content = []
    for out in outputs:
        for token_id, logprob, top in out.logprobs or []:
            entry = _token_logprob(tokenizer, token_id, logprob)
            entry["top_logprobs"] = [_token_logprob(tokenizer, t, lp) for t, lp in top]
            content.append(entry)
    return {"content": content, "refusal": None}


_TAG = re.compile(r"<\|[^|>]*\|>")
_OPEN_TAG = re.compile(r"<(\|[^|>]*\|?)?$")  # the start of a tag that more text may still close


class TagStripper:
    """Streamed ASR text with `<|en|>`-style tags removed and outer whitespace trimmed, as api.strip_tags does
    to a whole answer: text is released once no tag can still form around it."""

    def __init__(self):
        self.raw, self.sent = "", ""

    def text(self) -> str:
        return _TAG.sub("", self.raw).strip()

    def finish(self) -> str:
        """What the deltas still lack of the whole text (a held-back partial tag that never closed)."""
        full = self.text()
        delta = full[len(self.sent):] if full.startswith(self.sent) else ""
        self.sent = full
        return delta

    def push(self, piece: str) -> str:
        self.raw += piece
        hold = _OPEN_TAG.search(self.raw)
        stable = self.raw[: hold.start()] if hold else self.raw
        shown = _TAG.sub("", stable).strip()  # trailing spaces wait: they are dropped if nothing follows
        if not shown.startswith(self.sent):
            return ""
        delta, self.sent = shown[len(self.sent):], shown
        return delta


def verbose_transcription(results, language: str, duration: float, window: float, temperature: float,
                          usage_: dict) -> dict:
    """OpenAI's verbose_json: one segment per 30 s window, each transcribed alone (the model gives no
    timestamps, so a window's bounds are the honest ones). `results` holds (raw text, last Output, Outputs)."""
    segments = []
    for i, (raw, _, outs) in enumerate(results):
        text = _TAG.sub("", raw).strip()
        lps = [lp for o in outs for _, lp, _ in o.logprobs or []]
        data = text.encode()
        segments.append({
            "id": i, "seek": round(i * window * 100), "start": i * window,
            "end": duration if i == len(results) - 1 else (i + 1) * window,  # a tail under 321 samples joins the last
            "text": text, "tokens": [t for o in outs for t in o.token_ids], "temperature": temperature,
            "avg_logprob": sum(lps) / len(lps) if lps else 0.0,
            "compression_ratio": len(data) / len(zlib.compress(data)) if data else 0.0,
            "no_speech_prob": 0.0,  # not estimated: Qwen2-Audio has no no-speech head
        })
    return {"task": "transcribe", "language": language, "duration": duration,
            "text": " ".join(seg["text"] for seg in segments if seg["text"]), "segments": segments, "usage": usage_}
