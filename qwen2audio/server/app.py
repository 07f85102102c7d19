"""The HTTP server: OpenAI-compatible chat completions, transcriptions and translations over the engine, plus
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
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import strip_tags
from ..audio import MIN_SAMPLES
from ..chat import ASR_LANGUAGES, asr_prompt, raw_prompt, translation_prompt
from ..engine.inputs import PromptInputs, prepare_chat, prepare_prompt
from ..engine.llm_engine import LLMEngine
from ..engine.sampling import SamplingParams
from ..engine.scheduler import PromptTooLong, QueueFull, Sequence
from ..errors import Qwen2AudioError
from ..features import N_SAMPLES, SAMPLE_RATE
from .errors import APIError, BodyTooLarge, error_body, error_response
from .media import MediaPolicy, decode_audio, fetch_source
from .metrics import ServerMetrics
from .protocol import (ChatRequest, TagStripper, chat_logprobs, chunk, completion, form_text, new_id,
                       parse_chat_request, parse_json, parse_speech_form, speech_usage, sse, usage,
                       verbose_transcription)

log = logging.getLogger("qwen2audio.server")
STATIC_DIR = Path(__file__).parent / "static"
TAG = re.compile(r"<\|([a-z]{2,3})\|>")
# Idle keep-alive connections are closed after this many seconds: longer than clients keep theirs (httpx, so the
# openai client, drops an idle pooled connection after 5 s). At uvicorn's default of 5 s both ends let go at the same
# moment, and a request sent 5 s after the last one could meet "Server disconnected without sending a response".
KEEP_ALIVE_S = 75
DETECT_TOKENS = 8  # enough for the language tag the ASR prompt's answer starts with (<|yue|> is several tokens)


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

    def submit_speech(wav, instruction: str, params: SamplingParams, max_tokens: int | None, arrival: float):
        # `prompt` (Whisper's context text) has no counterpart in Qwen2-Audio's task prompts: ignored.
        prompt = prepare_prompt(tokenizer, raw_prompt(instruction), [wav], config.truncate)
        room = engine.max_len - len(prompt.ids)  # a larger max_completion_tokens is cut to what fits, as in vLLM
        return submit(prompt, params, max(1, min(max_tokens or config.transcription_max_tokens, room)), False, arrival)

    async def detect_language(request: Request, wav, arrival: float) -> str | None:
        """The language tag the model writes first on the ASR prompt (`<|de|>`); None if the client left."""
        seq, bridge = await run_in_threadpool(submit_speech, wav, asr_prompt(None), SamplingParams(temperature=0.0),
                                              DETECT_TOKENS, arrival)
        result = await gather(request, seq, bridge)
        if result is None:
            return None
        if result[1].finish_reason == "error":
            raise APIError(500, result[1].error or "generation failed", "generation_failed")
        found = TAG.search(result[0])
        if found is None or found.group(1) not in ASR_LANGUAGES:
            raise APIError(400, "could not tell the language of the speech (the model wrote no language tag); send "
                                "its code in the form field 'language' (e.g. extra_body={'language': 'de'})",
                           "language_not_detected", "language")
        return found.group(1)

    async def speech(request: Request, endpoint: str):
        """/v1/audio/transcriptions and /v1/audio/translations: one clip, the base model's task prompt."""
        arrival = time.perf_counter()
        submitted = []
        try:
            check_queue()
            form = await request.form(max_files=1, max_fields=16)
            check_model(form_text(form, "model"))
            req = parse_speech_form(form, endpoint, ASR_LANGUAGES)
            data = await req.upload.read()
            if not data:
                raise APIError(400, "the uploaded file is empty (0 bytes)", "invalid_audio", "file")
            wav = await run_in_threadpool(decode_within_limit, data, "file", 0.0)
            if endpoint == "translations":
                source = req.language or await detect_language(request, wav, arrival)
                if source is None:
                    metrics.record(endpoint, 499)
                    return Response(status_code=499)
                instruction = translation_prompt(source, req.to_language or "en")
            else:
                instruction = asr_prompt(req.language)
            # verbose_json: one request per 30 s window, so that each segment's text is that window's own
            clips = [wav[i: i + N_SAMPLES] for i in range(0, len(wav), N_SAMPLES)] if req.format == "verbose_json" \
                else [wav]
            if len(clips) > 1 and len(clips[-1]) < MIN_SAMPLES:  # too short for an audio token: part of the window before
                clips[-2:] = [np.concatenate(clips[-2:])]
            for clip in clips:
                submitted.append(await run_in_threadpool(submit_speech, clip, instruction, req.params, req.max_tokens,
                                                         arrival))
        except (APIError, Qwen2AudioError) as e:
            for seq, _ in submitted:
                engine.cancel(seq)
            e = e if isinstance(e, APIError) else APIError(400, str(e), "invalid_value")
            metrics.record(endpoint, e.status)
            return error_response(e)
        seconds = len(wav) / SAMPLE_RATE
        if req.stream:
            seq, bridge = submitted[0]
            return StreamingResponse(stream_transcription(seq, bridge, seconds), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = []
        for i, (seq, bridge) in enumerate(submitted):
            result, failure = await answer_or_failure(endpoint, request, seq, bridge,
                                                      last_part=i == len(submitted) - 1)
            if failure is not None:
                for other, _ in submitted[i + 1:]:
                    engine.cancel(other)
                return failure
            results.append(result)
        usage_ = speech_usage(sum(r[1].prompt_tokens for r in results), sum(r[1].completion_tokens for r in results),
                              seconds)
        if req.format == "verbose_json":
            spoken = next((m.group(1) for raw, _, _ in results for m in [TAG.search(raw)] if m), None)
            return verbose_transcription(results, req.language or spoken or "unknown", seconds,
                                         N_SAMPLES / SAMPLE_RATE, req.params.temperature, usage_)
        text = strip_tags(results[0][0])
        if req.format == "text":
            return PlainTextResponse(text)
        # OpenAI's translation object is {"text"} alone
        return {"text": text, "usage": usage_} if endpoint == "transcriptions" else {"text": text}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await speech(request, "transcriptions")

    @app.post("/v1/audio/translations")
    async def translations(request: Request):
        return await speech(request, "translations")

    async def stream_transcription(seq: Sequence, bridge: _Bridge, seconds: float):
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
                           "usage": speech_usage(last.prompt_tokens, last.completion_tokens, seconds)})
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
