"""Where answers come from: our model in this process, or any OpenAI-compatible server.

Both take a batch of (text, 16 kHz waveform) requests of one mode and return one answer each:
- "raw": text is a base-model prompt holding one <|audio_bos|><|AUDIO|><|audio_eos|> block;
- "chat": text is the user's question, sent after the audio in a single user turn.

A server only speaks the chat API, so a raw prompt sent there loses its audio block and goes out as
the text after the audio in a user message: the server wraps it in the chat template, which the
base model did not see in pre-training. Scores of base-model tasks through --endpoint are therefore
not the paper's protocol; use --model for those numbers.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..audio import SAMPLE_RATE
from ..chat import AUDIO_BLOCK
from ..tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS


def wav_bytes(wav: np.ndarray) -> bytes:
    """32-bit float WAV: the decoded 16 kHz samples reach the server bit for bit (no 16-bit rounding)."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wav, SAMPLE_RATE, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def text_after_audio(prompt: str) -> str:
    """A raw prompt without its audio block(s): what goes after the audio in a chat message."""
    for marker in (AUDIO_BLOCK, AUDIO_BOS, AUDIO_EOS, AUDIO):
        prompt = prompt.replace(marker, "")
    return prompt.strip()


class LocalBackend:
    def __init__(self, pipe, sampling):
        self.pipe = pipe
        self.sampling = sampling

    def describe(self) -> dict:
        return {"kind": "model"}

    def generate(self, mode: str, requests: list[tuple[str, np.ndarray]]) -> list[str]:
        if mode == "raw":
            return self.pipe.complete([t for t, _ in requests], [w for _, w in requests], self.sampling)
        # An empty text is voice chat: the user turn holds only the audio (as the endpoint sends it).
        conversations = [[{"role": "user", "content": [{"type": "audio", "audio": w}]
                           + ([{"type": "text", "text": t}] if t else [])}] for t, w in requests]
        return self.pipe.chat_batch(conversations, self.sampling)


class EndpointBackend:
    """Sends the requests of a batch concurrently, one chat completion each."""

    def __init__(self, client, model: str, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, concurrency: int = 8, extra: dict | None = None):
        self.client = client
        self.model = model
        self.params = {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                       **(extra or {})}
        self.concurrency = max(1, concurrency)

    def describe(self) -> dict:
        # The server's address is not part of the answers' identity: a run may resume against the
        # same model served elsewhere.
        return {"kind": "endpoint", "model": self.model}

    @staticmethod
    def messages(mode: str, text: str, wav: np.ndarray) -> list[dict]:
        audio = {"type": "input_audio",
                 "input_audio": {"data": base64.b64encode(wav_bytes(wav)).decode("ascii"), "format": "wav"}}
        text = text_after_audio(text) if mode == "raw" else text
        content = [audio] + ([{"type": "text", "text": text}] if text else [])
        return [{"role": "user", "content": content}]

    def generate(self, mode: str, requests: list[tuple[str, np.ndarray]]) -> list[str]:
        def one(request):
            return self.client.complete(self.messages(mode, *request), model=self.model, **self.params)

        with ThreadPoolExecutor(min(self.concurrency, len(requests)) or 1) as pool:
            return list(pool.map(one, requests))
