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

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import strip_tags
from ..chat import asr_prompt, raw_prompt
from ..engine.inputs import PromptInputs, prepare_chat, prepare_prompt
from ..engine.llm_engine import LLMEngine
from ..engine.sampling import SamplingParams
from ..engine.scheduler import PromptTooLong, QueueFull, Sequence
from ..features import SAMPLE_RATE
from .errors import APIError, BodyTooLarge, error_body, error_response
from .media import MediaPolicy, decode_audio, fetch_source
from .metrics import ServerMetrics
from .protocol import ChatRequest, chunk, completion, new_id, parse_chat_request, parse_json, sse, usage

log = logging.getLogger("qwen2audio.server")
STATIC_DIR = Path(__file__).parent / "static"
LANGUAGE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})?$")


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

    def check_audio_seconds(seconds: float) -> None:
        if seconds > config.max_audio_seconds:
            raise APIError(400, f"the request has {seconds:.1f} s of audio; this server accepts at most "
                                f"{config.max_audio_seconds:g} s per request (--max-audio-seconds)", "audio_too_long")

    def prepare_chat_prompt(req: ChatRequest) -> PromptInputs:
        """Thread pool: fetch and decode every audio part (errors name the part), then tokenize."""
        decoded, seconds = {}, 0.0
        for param, part in req.audio_parts:
            wav = decode_audio(fetch_source(part, config.media, param), param)
            seconds += len(wav) / SAMPLE_RATE
            check_audio_seconds(seconds)
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
        pieces, next_check = [], time.monotonic() + 0.5
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
                pieces.append(out.text)
                if out.finished:
                    return "".join(pieces), out
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
            # a multi-megabyte body (inline audio) is parsed off the event loop
            body = parse_json(raw) if len(raw) < 2**20 else await run_in_threadpool(parse_json, raw)
            check_model(body.get("model"))
            req = parse_chat_request(body)
            if len(req.audio_parts) > config.max_audios:
                raise APIError(400, f"the request has {len(req.audio_parts)} audio parts; this server accepts at "
                                    f"most {config.max_audios} (--max-audios)", "too_many_audios", "messages")
            prompt = await run_in_threadpool(prepare_chat_prompt, req)
            seq, bridge = submit(prompt, req.params, req.max_tokens, req.ignore_eos, arrival)
        except APIError as e:
            metrics.record("chat", e.status)
            return error_response(e)
        except ValueError as e:  # sampling values SamplingParams refuses, placeholder mismatches
            metrics.record("chat", 400)
            return error_response(APIError(400, str(e), "invalid_value"))
        rid = new_id()
        if req.stream:
            return StreamingResponse(stream_chat(rid, seq, bridge, req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result, failure = await answer_or_failure("chat", request, seq, bridge)
        if failure is not None:
            return failure
        text, last = result
        return completion(rid, config.model_name, text, last.finish_reason, last.prompt_tokens, last.completion_tokens)

    async def answer_or_failure(endpoint: str, request: Request, seq: Sequence, bridge: _Bridge):
        """Wait for a whole answer: ((text, last), None), or (None, response) when the client left or generation failed."""
        result = await gather(request, seq, bridge)
        if result is None:
            metrics.record(endpoint, 499)
            return None, Response(status_code=499)
        if result[1].finish_reason == "error":
            metrics.record(endpoint, 500)
            return None, JSONResponse(error_body(500, result[1].error or "generation failed"), status_code=500)
        metrics.record(endpoint, 200, **timings(seq))
        return result, None

    async def stream_chat(rid: str, seq: Sequence, bridge: _Bridge, include_usage: bool):
        created, model, done = int(time.time()), config.model_name, False
        try:
            yield sse(chunk(rid, created, model, {"role": "assistant", "content": ""}, include_usage=include_usage))
            while True:
                outs = [await bridge.queue.get()]
                while not bridge.queue.empty():  # a slow reader gets several tokens per event
                    outs.append(bridge.queue.get_nowait())
                text, last = "".join(o.text for o in outs), outs[-1]
                if text:
                    yield sse(chunk(rid, created, model, {"content": text}, include_usage=include_usage))
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

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        arrival = time.perf_counter()
        try:
            check_queue()
            form = await request.form(max_files=1, max_fields=16)
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise APIError(400, "send the audio as a multipart/form-data upload in the field 'file'",
                               "missing_file", "file")
            check_model(text_field(form, "model"))
            language = text_field(form, "language")
            if language is not None and not LANGUAGE.match(language):
                raise APIError(400, f"language must be a code such as 'en' or 'zh', got {language[:20]!r}",
                               "invalid_value", "language")
            fmt = text_field(form, "response_format") or "json"
            if fmt not in ("json", "text"):
                raise APIError(400, f"response_format {fmt!r} is not supported; use json or text",
                               "unsupported_parameter", "response_format")
            try:
                temperature = float(text_field(form, "temperature") or 0.0)
                params = SamplingParams(temperature=temperature)
            except ValueError:
                raise APIError(400, "temperature must be a number >= 0", "invalid_value", "temperature") from None
            data = await upload.read()
            if not data:
                raise APIError(400, "the uploaded file is empty (0 bytes)", "invalid_audio", "file")
            wav = await run_in_threadpool(decode_audio, data, "file")
            check_audio_seconds(len(wav) / SAMPLE_RATE)
            # `prompt` (Whisper's context text) has no counterpart in Qwen2-Audio's ASR prompt: ignored.
            prompt = await run_in_threadpool(prepare_prompt, tokenizer, raw_prompt(asr_prompt(language)), [wav],
                                             config.truncate)
            room = engine.max_len - len(prompt.ids)
            seq, bridge = submit(prompt, params, max(1, min(config.transcription_max_tokens, room)), False, arrival)
        except APIError as e:
            metrics.record("transcriptions", e.status)
            return error_response(e)
        result, failure = await answer_or_failure("transcriptions", request, seq, bridge)
        if failure is not None:
            return failure
        text, last = strip_tags(result[0]), result[1]
        if fmt == "text":
            return PlainTextResponse(text)
        return {"text": text, "usage": {"type": "tokens", "input_tokens": last.prompt_tokens,
                                        "output_tokens": last.completion_tokens,
                                        "total_tokens": last.prompt_tokens + last.completion_tokens}}

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
