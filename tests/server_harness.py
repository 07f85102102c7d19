"""Start the real server (uvicorn, in a thread of the test process) on 127.0.0.1 and a free port."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
import soundfile as sf
import uvicorn

import qwen2audio
from qwen2audio.engine.llm_engine import LLMEngine
from qwen2audio.server.app import KEEP_ALIVE_S, ServerConfig, create_app

MODEL = "tiny"


class RunningServer:
    def __init__(self, app, engine: LLMEngine):
        self.app, self.engine = app, engine
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))  # the OS picks a free port; uvicorn serves on this very socket
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_keep_alive=KEEP_ALIVE_S))  # as `qwen2audio serve`
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def client(self, **kw):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def start_server(checkpoint_dir, engine_options: dict | None = None, device: str = "cpu", **config) -> RunningServer:
    pipe = qwen2audio.load(checkpoint_dir, device=device, progress=False)
    engine = LLMEngine(pipe.model, pipe.tokenizer, pipe.stop_ids, **{"max_batch": 8, **(engine_options or {})})
    app = create_app(engine, ServerConfig(model_name=MODEL, **config))
    return RunningServer(app, engine)


def wav_bytes(wav: np.ndarray, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, 16000, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def input_audio(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(data), "format": fmt}}


def audio_url(data: bytes, mime: str = "audio/wav") -> dict:
    return {"type": "audio_url", "audio_url": {"url": f"data:{mime};base64,{b64(data)}"}}


def metric(text: str, name: str) -> float:
    """The value of one sample line `name value` in a Prometheus exposition (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
