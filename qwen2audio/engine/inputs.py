"""One request's prompt as the engine consumes it: expanded token ids plus 30 s audio windows.

This mirrors `Qwen2AudioProcessor.__call__` for a single prompt (same placeholder expansion, same
token ids) but stops before the log-mel features: the engine computes features and encodings
only for windows that are not already in its encoded-audio cache, keyed by `window_key`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..audio import AudioError, load_audio
from ..chat import render_chat
from ..features import SAMPLE_RATE, num_audio_tokens, num_valid_frames, split_windows
from ..tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, Tokenizer


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
        raise ValueError(f"the text has {n_slots} {AUDIO} placeholder(s) but {len(clips)} audio(s) were given")
    windows, replacements, seconds = [], [], 0.0
    for i, clip in enumerate(clips):
        try:
            wav = load_audio(clip)
        except AudioError as e:
            raise AudioError(f"audio {i + 1}: {e}") from None
        seconds += len(wav) / SAMPLE_RATE
        parts = split_windows(wav, truncate=truncate)
        counts = [num_audio_tokens(num_valid_frames(len(p))) for p in parts]
        if min(counts) <= 0:
            raise AudioError(f"audio {i + 1}: too short to give any audio token")
        windows.extend(parts)
        replacements.append(f"{AUDIO_EOS}{AUDIO_BOS}".join(AUDIO * n for n in counts))
    pieces = text.split(AUDIO)
    expanded = [pieces[0]]
    for replacement, piece in zip(replacements, pieces[1:]):
        expanded += [replacement, piece]
    ids = tokenizer.encode("".join(expanded))
    return PromptInputs(ids=ids, windows=windows, keys=[window_key(w) for w in windows], audio_seconds=seconds)


def prepare_chat(tokenizer: Tokenizer, messages: list[dict], truncate: bool = False) -> PromptInputs:
    """Render an OpenAI-shaped conversation, decode its audio parts and expand the prompt."""
    text, sources = render_chat(messages)
    return prepare_prompt(tokenizer, text, sources, truncate=truncate)
