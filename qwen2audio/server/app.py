"""The HTTP server: OpenAI-compatible chat completions and transcriptions over the engine, plus
/v1/models, /health, /metrics and the web page at /.

Request handling runs on the event loop; decoding audio, fetching media and tokenizing run in the
thread pool; the model runs only in the engine's thread. Outputs cross back to the loop through
`call_soon_threadsafe` into one asyncio.Queue per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import strip_tags
from ..audio import MIN_SAMPLES
from ..chat import ASR_LANGUAGES, asr_prompt, raw_prompt
from ..engine.inputs import PromptInputs, prepare_chat, prepare_prompt
from ..engine.llm_engine import LLMEngine
from ..engine.sampling import SamplingParams
from ..engine.scheduler import PromptTooLong, QueueFull, Sequence
from ..errors import Qwen2AudioError
from ..features import N_SAMPLES, SAMPLE_RATE
from .errors import APIError, BodyTooLarge, error_body, error_response
from .media import MediaPolicy, decode_audio, fetch_source
from .metrics import ServerMetrics
from .protocol import (ChatRequest, TagStripper, chat_logprobs, chunk, completion, new_id, parse_chat_request,
                       parse_json, sse, usage, verbose_transcription)

log = logging.getLogger("qwen2audio.server")
STATIC_DIR = Path(__file__).parent / "static"
TAG = re.compile(r"<\|([a-z]{2,3})\|>")


@dataclass
class ServerConfig:
    model_name: str
    max_request_bytes: int = 32 * 2**20
    max_audio_seconds: float = 600.0  # decoded audio per request, all clips together
    max_audios: int = 8
    default_max_tokens: int = 1024  # when a request gives no max_tokens (capped by what fits)
    transcription_max_tokens: int = 256  # the paper's ASR setting
    truncate: bool = False  # keep only the first 30 s of each clip, like the reference
    media: MediaPolicy = field(default_factory=MediaPolicy)


class BodyLimit:
    """ASGI middleware: 413 for a declared Content-Length over the limit; a streamed body that
    grows past it raises BodyTooLarge inside the endpoint (answered 413 by its handler)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            err = BodyTooLarge(self.max_bytes)
            return await error_response(err)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class _Dispatcher:
    """Engine thread -> event loop with one wake-up per burst. The engine emits one Output per running
    request per step, within microseconds; waking the loop once per step instead of once per Output
    matters on small CPUs, where every wake-up preempts one of the model's compute threads."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list = []

    def put(self, queue: asyncio.Queue, out) -> None:
        with self.lock:
            first = not self.pending
            self.pending.append((queue, out))
        if first:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self.lock:
            items, self.pending = self.pending, []
        for queue, out in items:
            queue.put_nowait(out)


class _Bridge:
    """One request's outputs, delivered into an asyncio.Queue on the event loop."""

    def __init__(self, dispatcher: _Dispatcher):
        self.dispatcher = dispatcher
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, out) -> None:
        self.dispatcher.put(self.queue, out)


def create_app(engine: LLMEngine, config: ServerConfig) -> FastAPI:
    tokenizer = engine.tokenizer
    metrics = ServerMetrics()

    @asynccontextmanager
    async def lifespan(app):
        app.state.dispatcher = _Dispatcher(asyncio.get_running_loop())
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="qwen2audio", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config, app.state.metrics = engine, config, metrics
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal server error: {type(err).__name__}"), status_code=500)

    # ---- helpers ----------------------------------------------------------------------------
    def check_model(name) -> None:
        if name is None or name == config.model_name:
            return
        if not isinstance(name, str):
            raise APIError(400, "model must be a string", "invalid_value", "model")
        raise APIError(404, f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                       "model_not_found", "model")

    def text_field(form, name: str) -> str | None:
        value = form.get(name)
        if value is not None and not isinstance(value, str):
            raise APIError(400, f"form field {name!r} must be text, not a file", "invalid_value", name)
        return value or None

    def check_queue() -> None:
        """Refuse early when the queue is full, before decoding audio that would be thrown away."""
        if engine.scheduler.queue_depth >= engine.scheduler.max_queue:
            raise APIError(429, f"the server's queue is full ({engine.scheduler.max_queue} waiting requests); "
                                f"retry later", "queue_full")

    def decode_within_limit(source, param: str, seconds_before: float):
        """Decode one clip, stopping as soon as the request's audio passes --max-audio-seconds."""
        try:
            return decode_audio(source, param, config.max_audio_seconds - seconds_before)
        except APIError as e:
            if e.code != "audio_too_long":
                raise
            raise APIError(400, f"{param}: the request has more than {config.max_audio_seconds:g} s of audio; this "
                                f"server accepts at most {config.max_audio_seconds:g} s per request "
                                f"(--max-audio-seconds)", "audio_too_long", param) from None

    def check_text_fits(req: ChatRequest) -> None:
        """Refuse text that cannot fit the context before tokenising it: a token covers at most
        `max_token_chars` characters, so this bound needs only the lengths (a 20 MB message tokenised first
        held the GIL for half a minute and took 3.6 GB)."""
        chars = sum(len(m["content"]) if isinstance(m["content"], str) else
                    sum(len(p["text"]) for p in m["content"] if p.get("type") == "text") for m in req.messages)
        # and each message at least <|im_start|>, its role and <|im_end|>
        at_least = chars // tokenizer.max_token_chars + 3 * len(req.messages)
        if at_least >= engine.max_len:
            raise APIError(400, f"the messages hold {chars} characters in {len(req.messages)} messages, at least "
                                f"{at_least} tokens; this server's "
                                f"context limit is {engine.max_len} tokens (prompt + answer)",
                           "context_length_exceeded", "messages")

    def parse_chat(raw: bytes) -> ChatRequest:
        body = parse_json(raw)
        check_model(body.get("model"))
        req = parse_chat_request(body)
        if len(req.audio_parts) > config.max_audios:
            raise APIError(400, f"the request has {len(req.audio_parts)} audio parts; this server accepts at "
                                f"most {config.max_audios} (--max-audios)", "too_many_audios", "messages")
        check_text_fits(req)
        return req

    def prepare_chat_prompt(req: ChatRequest) -> PromptInputs:
        """Thread pool: fetch and decode every audio part (errors name the part), then tokenize."""
        decoded, seconds = {}, 0.0
        for param, part in req.audio_parts:
            wav = decode_within_limit(fetch_source(part, config.media, param), param, seconds)
            seconds += len(wav) / SAMPLE_RATE
            decoded[id(part)] = wav
        messages = [m if isinstance(m["content"], str) else
                    {**m, "content": [{"type": "audio", "audio": decoded[id(p)]} if id(p) in decoded else p
                                      for p in m["content"]]}
                    for m in req.messages]
        return prepare_chat(tokenizer, messages, truncate=config.truncate)

    def submit(prompt: PromptInputs, params: SamplingParams, max_tokens: int | None, ignore_eos: bool,
               arrival: float) -> tuple[Sequence, _Bridge]:
        room = engine.max_len - len(prompt.ids)
        if max_tokens is None:
            max_tokens = max(1, min(config.default_max_tokens, room))
        params = dataclasses.replace(params, max_new_tokens=max_tokens)
        bridge = _Bridge(app.state.dispatcher)
        try:
            seq = engine.submit(prompt, params, sink=bridge, ignore_eos=ignore_eos, arrival=arrival)
        except PromptTooLong as e:
            raise APIError(400, str(e), "context_length_exceeded", "messages") from None
        except QueueFull as e:
            raise APIError(429, str(e), "queue_full") from None
        return seq, bridge

    async def gather(request: Request, seq: Sequence, bridge: _Bridge):
        """Wait for the whole answer; cancel it if the client goes away meanwhile (returns None)."""
        outs, next_check = [], time.monotonic() + 0.5
        try:
            while True:
                try:
                    out = await asyncio.wait_for(bridge.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    out = None
                if time.monotonic() >= next_check:  # tokens may arrive every few ms: check by the clock
                    next_check = time.monotonic() + 0.5
                    if await request.is_disconnected():
                        engine.cancel(seq)
                        return None
                if out is None:
                    continue
                outs.append(out)
                if out.finished:
                    return "".join(o.text for o in outs), out, outs
        except BaseException:
            engine.cancel(seq)
            raise

    def timings(seq: Sequence) -> dict:
        ttft = seq.first_token_time - seq.arrival if seq.first_token_time else None
        e2e = seq.finish_time - seq.arrival if seq.finish_time else None
        return {"ttft": ttft, "e2e": e2e}

    # ---- endpoints --------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival = time.perf_counter()
        try:
            check_queue()
            raw = await request.body()
            # a multi-megabyte body (inline audio, a long text, thousands of messages) is checked off the event loop
            req = parse_chat(raw) if len(raw) < 2**20 else await run_in_threadpool(parse_chat, raw)
            prompt = await run_in_threadpool(prepare_chat_prompt, req)
            seq, bridge = submit(prompt, req.params, req.max_tokens, req.ignore_eos, arrival)
        except APIError as e:
            metrics.record("chat", e.status)
            return error_response(e)
        except Qwen2AudioError as e:  # e.g. <|AUDIO|> placeholders typed into the text; anything else is a bug: 500
            metrics.record("chat", 400)
            return error_response(APIError(400, str(e), "invalid_value"))
        rid = new_id()
        if req.stream:
            return StreamingResponse(stream_chat(rid, seq, bridge, req.include_usage, req.params.logprobs),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result, failure = await answer_or_failure("chat", request, seq, bridge)
        if failure is not None:
            return failure
        text, last, outs = result
        logprobs = chat_logprobs(tokenizer, outs) if req.params.logprobs is not None else None
        return completion(rid, config.model_name, text, last.finish_reason, last.prompt_tokens, last.completion_tokens,
                          logprobs)

    async def answer_or_failure(endpoint: str, request: Request, seq: Sequence, bridge: _Bridge, last_part: bool = True):
        """Wait for a whole answer: ((text, last Output, Outputs), None), or (None, response) when the client left or
        generation failed. A request answered in several parts (verbose_json's windows) is counted at its last."""
        result = await gather(request, seq, bridge)
        if result is None:
            metrics.record(endpoint, 499)
            return None, Response(status_code=499)
        if result[1].finish_reason == "error":
            metrics.record(endpoint, 500)
            return None, JSONResponse(error_body(500, result[1].error or "generation failed"), status_code=500)
        if last_part:
            metrics.record(endpoint, 200, **timings(seq))
        return result, None

    async def stream_chat(rid: str, seq: Sequence, bridge: _Bridge, include_usage: bool, logprobs: int | None):
        created, model, done = int(time.time()), config.model_name, False
        try:
            yield sse(chunk(rid, created, model, {"role": "assistant", "content": ""}, include_usage=include_usage))
            while True:
                outs = [await bridge.queue.get()]
                while not bridge.queue.empty():  # a slow reader gets several tokens per event
                    outs.append(bridge.queue.get_nowait())
                text, last = "".join(o.text for o in outs), outs[-1]
                lp = chat_logprobs(tokenizer, outs) if logprobs is not None else None
                if text or (lp and lp["content"]):
                    yield sse(chunk(rid, created, model, {"content": text}, include_usage=include_usage, logprobs=lp))
                if last.finished:
                    break
            done = True
            if last.finish_reason == "error":
                metrics.record("chat", 500)
                yield sse(error_body(500, last.error or "generation failed"))
            else:
                metrics.record("chat", 200, **timings(seq))
                yield sse(chunk(rid, created, model, {}, last.finish_reason, include_usage=include_usage))
                if include_usage:
                    yield sse(chunk(rid, created, model, None, usage_=usage(last.prompt_tokens, last.completion_tokens),
                                    include_usage=True))
            yield sse("[DONE]")
        finally:
            if not done:  # the client disconnected (or the server is stopping): free the slot now
                engine.cancel(seq)
                metrics.record("chat", 499)

    def transcription_form(form) -> dict:
        """The checked fields of a transcription request (everything but the audio)."""
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "send the audio as a multipart/form-data upload in the field 'file'",
                           "missing_file", "file")
        check_model(text_field(form, "model"))
        language = text_field(form, "language")
        if language is not None and language not in ASR_LANGUAGES:
            raise APIError(400, f"language {language[:20]!r} is not one this model transcribes; use one of "
                                f"{', '.join(ASR_LANGUAGES)}, or leave it out to have the language detected",
                           "invalid_value", "language")
        fmt = text_field(form, "response_format") or "json"
        if fmt not in ("json", "text", "verbose_json"):
            raise APIError(400, f"response_format {fmt!r} is not supported; use json, text or verbose_json (this "
                                f"model gives no timestamps for srt or vtt)", "unsupported_parameter", "response_format")
        stream = (text_field(form, "stream") or "false").lower()
        if stream not in ("true", "false"):
            raise APIError(400, "stream must be true or false", "invalid_value", "stream")
        if stream == "true" and fmt == "verbose_json":
            raise APIError(400, "stream=true gives text events; ask for json or text with it, not verbose_json",
                           "unsupported_parameter", "response_format")
        try:
            temperature = float(text_field(form, "temperature") or 0.0)
            if not 0 <= temperature <= 2:
                raise ValueError
            # verbose_json segments carry avg_logprob: ask the engine for each token's log-probability
            params = SamplingParams(temperature=temperature, logprobs=0 if fmt == "verbose_json" else None)
        except ValueError:  # float("x"), nan, inf, out of range
            raise APIError(400, "temperature must be a number in [0, 2]", "invalid_value", "temperature") from None
        return {"upload": upload, "language": language, "format": fmt, "stream": stream == "true", "params": params}

    def submit_asr(wav, language, params, arrival) -> tuple[Sequence, _Bridge]:
        # `prompt` (Whisper's context text) has no counterpart in Qwen2-Audio's ASR prompt: ignored.
        prompt = prepare_prompt(tokenizer, raw_prompt(asr_prompt(language)), [wav], config.truncate)
        room = engine.max_len - len(prompt.ids)
        return submit(prompt, params, max(1, min(config.transcription_max_tokens, room)), False, arrival)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        arrival = time.perf_counter()
        submitted = []
        try:
            check_queue()
            form = await request.form(max_files=1, max_fields=16)
            fields = transcription_form(form)
            data = await fields["upload"].read()
            if not data:
                raise APIError(400, "the uploaded file is empty (0 bytes)", "invalid_audio", "file")
            wav = await run_in_threadpool(decode_within_limit, data, "file", 0.0)
            # verbose_json: one request per 30 s window, so that each segment's text is that window's own
            clips = [wav[i: i + N_SAMPLES] for i in range(0, len(wav), N_SAMPLES)] if fields["format"] == "verbose_json" \
                else [wav]
            if len(clips) > 1 and len(clips[-1]) < MIN_SAMPLES:  # too short for an audio token: part of the window before
                clips[-2:] = [np.concatenate(clips[-2:])]
            for clip in clips:
                submitted.append(await run_in_threadpool(submit_asr, clip, fields["language"], fields["params"], arrival))
        except (APIError, Qwen2AudioError) as e:
            for seq, _ in submitted:
                engine.cancel(seq)
            e = e if isinstance(e, APIError) else APIError(400, str(e), "invalid_value")
            metrics.record("transcriptions", e.status)
            return error_response(e)
        if fields["stream"]:
            seq, bridge = submitted[0]
            return StreamingResponse(stream_transcription(seq, bridge), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = []
        for i, (seq, bridge) in enumerate(submitted):
            result, failure = await answer_or_failure("transcriptions", request, seq, bridge,
                                                      last_part=i == len(submitted) - 1)
            if failure is not None:
                for other, _ in submitted[i + 1:]:
                    engine.cancel(other)
                return failure
            results.append(result)
        prompt_tokens = sum(r[1].prompt_tokens for r in results)
        output_tokens = sum(r[1].completion_tokens for r in results)
        usage_ = {"type": "tokens", "input_tokens": prompt_tokens, "output_tokens": output_tokens,
                  "total_tokens": prompt_tokens + output_tokens}
        if fields["format"] == "verbose_json":
            spoken = next((m.group(1) for raw, _, _ in results for m in [TAG.search(raw)] if m), None)
            return verbose_transcription(results, fields["language"] or spoken or "unknown", len(wav) / SAMPLE_RATE,
                                         N_SAMPLES / SAMPLE_RATE, fields["params"].temperature, usage_)
        text = strip_tags(results[0][0])
        if fields["format"] == "text":
            return PlainTextResponse(text)
        return {"text": text, "usage": usage_}

    async def stream_transcription(seq: Sequence, bridge: _Bridge):
        """OpenAI's transcription stream: transcript.text.delta events, then transcript.text.done."""
        stripper, done = TagStripper(), False
        try:
            while True:
                outs = [await bridge.queue.get()]
                while not bridge.queue.empty():
                    outs.append(bridge.queue.get_nowait())
                last = outs[-1]
                delta = stripper.push("".join(o.text for o in outs))
                if last.finished:
                    delta += stripper.finish()
                if delta:
                    yield sse({"type": "transcript.text.delta", "delta": delta})
                if last.finished:
                    break
            done = True
            if last.finish_reason == "error":
                metrics.record("transcriptions", 500)
                yield sse(error_body(500, last.error or "generation failed"))
            else:
                metrics.record("transcriptions", 200, **timings(seq))
                yield sse({"type": "transcript.text.done", "text": stripper.text(),
                           "usage": {"type": "tokens", "input_tokens": last.prompt_tokens,
                                     "output_tokens": last.completion_tokens,
                                     "total_tokens": last.prompt_tokens + last.completion_tokens}})
            yield sse("[DONE]")
        finally:
            if not done:
                engine.cancel(seq)
                metrics.record("transcriptions", 499)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "qwen2audio", "max_model_len": engine.max_len}]}

    @app.get("/health")
    async def health():
        stats = engine.stats()
        return {"status": "ok", "model": config.model_name, "running": stats["running"], "waiting": stats["waiting"],
                "free_slots": stats["free_slots"], "max_model_len": engine.max_len}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine.stats()), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
