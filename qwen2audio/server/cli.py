"""`qwen2audio serve`: the OpenAI-compatible server and web page (registered by qwen2audio.cli)."""

from __future__ import annotations

import argparse
import errno
import socket
import sys

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_NAME = "qwen2audio-default"  # the default model's folder is called `default-model`: too vague as an id


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535, got {value}")
    return value


def served_name(option: str | None, model: str | None) -> str:
    """--served-model-name, else the --model directory's own name (`Qwen2-Audio-7B-Instruct`, also for `.` or
    a path with a trailing slash), else the default model's id."""
    from pathlib import Path

    if option:
        return option
    return Path(model).resolve().name if model is not None else DEFAULT_NAME


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the server's socket before the model loads (minutes for a large one), so that a port in use or a bad
    --host is reported at once; uvicorn then serves on this very socket."""
    from ..cli import UserError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise UserError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: no wait after a restart
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = "; another server is using it: stop it or choose another --port" if e.errno == errno.EADDRINUSE else ""
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    return sock


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__}: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def register(subparsers) -> dict:
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP server with a web page (continuous batching)",
        description="Serve the model over HTTP: POST /v1/chat/completions (streamed or not, audio as input_audio "
                    "or audio_url parts), POST /v1/audio/transcriptions, GET /v1/models, /health, /metrics, and a "
                    "chat page with audio upload and microphone recording at /. There is no authentication: "
                    "keep the default 127.0.0.1 bind unless a proxy in front of it controls access.",
    )
    from ..cli import add_model_options, add_truncate_option

    model = add_model_options(p)
    add_truncate_option(model)
    model.add_argument("--served-model-name", metavar="NAME", default=None,
                       help=f"the model id clients send and /v1/models lists (default: the --model directory's "
                            f"name; {DEFAULT_NAME!r} for the default model)")
    net = p.add_argument_group("network")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    net.add_argument("--port", type=port_number, default=8000, help="port, 1-65535 (default: 8000)")
    net.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    eng = p.add_argument_group("engine")
    eng.add_argument("--max-batch", type=_positive(int), default=16, metavar="N",
                     help="most requests running together (default: 16)")
    eng.add_argument("--max-model-len", type=_positive(int), default=None, metavar="TOKENS",
                     help="prompt + answer tokens per request (default: the model's positions, at most 4096)")
    eng.add_argument("--kv-cache-gb", type=_positive(float), default=None, metavar="GB",
                     help="memory for the paged KV cache, prefix cache included (default: --max-batch requests of "
                          "--max-model-len tokens); requests wait, or are preempted, when it is full")
    eng.add_argument("--max-queue", type=_positive(int), default=256, metavar="N",
                     help="requests waiting to run before new ones get HTTP 429 (default: 256)")
    eng.add_argument("--audio-cache-mb", type=float, default=256, metavar="MB",
                     help="memory for encoded audio reused across requests, e.g. by every turn of a "
                          "conversation (default: 256; 0 disables)")
    lim = p.add_argument_group("request limits")
    lim.add_argument("--max-request-mb", type=_positive(float), default=32, metavar="MB",
                     help="largest request body; larger ones get HTTP 413 (default: 32)")
    lim.add_argument("--max-audio-seconds", type=_positive(float), default=600, metavar="S",
                     help="decoded audio per request, all clips together (default: 600)")
    lim.add_argument("--max-audios", type=_positive(int), default=8, metavar="N",
                     help="audio parts per request (default: 8)")
    lim.add_argument("--default-max-tokens", type=_positive(int), default=1024, metavar="N",
                     help="answer length when a request gives no max_tokens (default: 1024, capped by "
                          "--max-model-len)")
    media = p.add_argument_group("audio sources beyond inline base64")
    media.add_argument("--allowed-local-media-path", metavar="DIR", default=None,
                       help="allow file:// URLs and paths, but only to files under DIR (symlinks resolved)")
    media.add_argument("--allow-remote-audio", action="store_true",
                       help="allow http(s):// audio URLs; the server then fetches them itself")
    media.add_argument("--remote-audio-timeout", type=_positive(float), default=10, metavar="S",
                       help="timeout for fetching remote audio (default: 10)")
    media.add_argument("--max-audio-mb", type=_positive(float), default=32, metavar="MB",
                       help="largest fetched or local audio file (default: 32)")
    return {"serve": cmd_serve}


def cmd_serve(args) -> int:
    import uvicorn

    from ..cli import load_pipeline
    from ..engine.llm_engine import LLMEngine
    from .app import KEEP_ALIVE_S, ServerConfig, create_app
    from .media import MediaPolicy

    policy = MediaPolicy(allowed_local_dir=args.allowed_local_media_path, allow_remote=args.allow_remote_audio,
                         remote_timeout=args.remote_audio_timeout, max_audio_bytes=int(args.max_audio_mb * 2**20))
    if args.host not in LOOPBACK:
        print(f"warning: binding {args.host}: the server has no authentication; anyone who can reach this "
              f"address can use the model", file=sys.stderr, flush=True)
    sock = bind_socket(args.host, args.port)
    try:
        pipe = load_pipeline(args)
        engine = LLMEngine(pipe.model, pipe.tokenizer, pipe.stop_ids, max_batch=args.max_batch,
                           max_model_len=args.max_model_len,
                           kv_cache_bytes=None if args.kv_cache_gb is None else int(args.kv_cache_gb * 2**30),
                           max_queue=args.max_queue, audio_cache_bytes=int(args.audio_cache_mb * 2**20),
                           n_mels=pipe.processor.n_mels)
        name = served_name(args.served_model_name, args.model)
        print(f"KV cache: {len(engine.blocks.blocks)} blocks of {engine.blocks.block_size} tokens "
              f"({engine.kv_cache_bytes / 2**20:.0f} MiB), up to {engine.num_slots} requests of at most {engine.max_len} "
              f"tokens at once; serving {name!r} on http://{args.host}:{args.port}/",
              file=sys.stderr, flush=True)
        config = ServerConfig(model_name=name, max_request_bytes=int(args.max_request_mb * 2**20),
                              max_audio_seconds=args.max_audio_seconds, max_audios=args.max_audios,
                              default_max_tokens=args.default_max_tokens, truncate=args.truncate, media=policy)
        server = uvicorn.Server(uvicorn.Config(create_app(engine, config), log_level=args.log_level,
                                               timeout_keep_alive=KEEP_ALIVE_S))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
