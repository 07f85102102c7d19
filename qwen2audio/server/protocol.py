"""The OpenAI chat-completions request, checked field by field, and the response shapes.

Bodies are parsed by hand rather than by pydantic models so that every mistake is answered with
OpenAI's error shape and a message naming the field (`messages[1].content[0].input_audio.data`).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

from ..engine.sampling import SamplingParams
from .errors import APIError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
AUDIO_TYPES = ("input_audio", "audio_url")
MAX_STOP_STRINGS = 8
GREEDY_BELOW = 1e-5  # temperatures under this are treated as 0 (greedy)
# Fields of OpenAI's API this server cannot honour: refused instead of silently ignored.
UNSUPPORTED = {
    "tools": lambda v: bool(v), "functions": lambda v: bool(v), "tool_choice": lambda v: v not in (None, "none"),
    "logprobs": lambda v: bool(v), "top_logprobs": lambda v: v not in (None, 0),
    "presence_penalty": lambda v: v not in (None, 0, 0.0), "frequency_penalty": lambda v: v not in (None, 0, 0.0),
    "logit_bias": lambda v: bool(v), "audio": lambda v: v is not None,
    "modalities": lambda v: v not in (None, ["text"]),
    "response_format": lambda v: v not in (None, {"type": "text"}),
}


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
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_json")
    return data


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
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
    temperature = float(_number(body, "temperature", 1.0, lo=0, hi=2))  # OpenAI's default is 1
    params = SamplingParams(
        max_new_tokens=max_tokens or 1,  # replaced once the prompt length is known
        # logits / 1e-40 overflow to inf (NaN probabilities): such temperatures mean greedy anyway
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=float(_number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)),
        top_k=max(0, top_k),  # -1 means off, as in vLLM
        repetition_penalty=float(_number(body, "repetition_penalty", 1.0, lo=0, lo_open=True)),
        seed=_number(body, "seed", None, lo=-(2**63), hi=2**63 - 1, integer=True),  # int64, as torch takes it
        stop=stop,
    )
    return ChatRequest(messages, audio, params, max_tokens, stream, bool(options.get("include_usage")), ignore_eos)


# ---- responses ----------------------------------------------------------------------------------
def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(rid: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None,
          usage_: dict | None = None, include_usage: bool = False) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]}
    if include_usage:
        out["usage"] = usage_
    return out


def sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()
