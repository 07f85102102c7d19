"""One request's prompt as the engine consumes it: expanded token ids plus 30 s audio windows.

This is `Qwen2AudioProcessor.__call__` for a single prompt (the same decoding, windowing and
placeholder expansion, so the same token ids) but it stops before the log-mel features: the engine computes features and encodings
only for windows that are not already in its encoded-audio cache, keyed by `window_key`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..chat import render_chat
from ..errors import AudioTokenMismatch
from ..processor import decode_and_window, expand_placeholders
from ..tokenizer import AUDIO, Tokenizer


@dataclass
class PromptInputs:
    ids: list[int]
    windows: list[np.ndarray] = field(default_factory=list)  # 16 kHz mono, <= 30 s each, in prompt order
    keys: list[bytes] = field(default_factory=list)  # window_key of each window
    audio_seconds: float = 0.0  # decoded audio in the request, before windowing

    @property
    def num_audio_windows(self) -> int:
        return len(self.windows)


def window_key(window: np.ndarray) -> bytes:
    """Content hash of a decoded window: the same clip re-sent in every turn maps to one entry."""
    data = np.ascontiguousarray(window, dtype=np.float32)
    return hashlib.blake2b(data.tobytes(), digest_size=16, person=b"q2a-window").digest()


def prepare_prompt(tokenizer: Tokenizer, text: str, clips: list, truncate: bool = False) -> PromptInputs:
    """`text` with one <|AUDIO|> per clip (clips: anything `load_audio` takes) -> PromptInputs.

    Raises AudioError for undecodable or too-short audio, ValueError for a placeholder mismatch."""
    n_slots = text.count(AUDIO)
    if n_slots != len(clips):
        raise AudioTokenMismatch(f"the text has {n_slots} {AUDIO} placeholder(s) but {len(clips)} audio(s) were given")
    windows, replacements, seconds = decode_and_window(clips, truncate=truncate)
    ids = tokenizer.encode(expand_placeholders([text], replacements)[0])
    return PromptInputs(ids=ids, windows=windows, keys=[window_key(w) for w in windows], audio_seconds=seconds)


def prepare_chat(tokenizer: Tokenizer, messages: list[dict], truncate: bool = False) -> PromptInputs:
    """Render an OpenAI-shaped conversation, decode its audio parts and expand the prompt."""
    text, sources = render_chat(messages)
    return prepare_prompt(tokenizer, text, sources, truncate=truncate)
