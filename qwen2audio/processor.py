"""Prompts + audio -> model inputs, with the same outputs as Hugging Face's Qwen2AudioProcessor.

Beyond the reference: audio longer than 30 s becomes several consecutive audio blocks instead of
being cut silently (``truncate=True`` restores the cut), `audios=` is an alias of `audio=`, and a
placeholder/audio count mismatch is an error that says which is which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .audio import AudioError, load_audio
from .chat import CHAT_TEMPLATE, render_chat
from .errors import AudioTokenMismatch, Qwen2AudioError
from .features import SAMPLE_RATE, log_mel_spectrogram, num_audio_tokens, num_valid_frames, split_windows
from .tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, Tokenizer

PREPROCESSOR_FILE = "preprocessor_config.json"


def decode_and_window(clips: list, sampling_rate: int | None = None, truncate: bool = False):
    """Decode every clip and cut it into 30 s windows.

    Returns (windows, replacements, seconds): the windows in order, for each clip the text that
    replaces its <|AUDIO|> placeholder (one audio block per window, with the right token count),
    and the total decoded duration.
    """
    windows, replacements, seconds = [], [], 0.0
    for i, clip in enumerate(clips):
        try:
            wav = load_audio(clip, sampling_rate)
        except AudioError as e:
            raise AudioError(f"audio {i + 1}: {e}") from None
        seconds += len(wav) / SAMPLE_RATE
        parts = split_windows(wav, truncate=truncate)
        counts = [num_audio_tokens(num_valid_frames(len(p))) for p in parts]
        if min(counts) <= 0:
            raise AudioError(f"audio {i + 1}: too short to give any audio token")
        windows.extend(parts)
        replacements.append(f"{AUDIO_EOS}{AUDIO_BOS}".join(AUDIO * n for n in counts))
    return windows, replacements, seconds


def expand_placeholders(texts: list[str], replacements: list[str]) -> list[str]:
    """Replace the k-th <|AUDIO|> across all texts with replacements[k]."""
    expanded, k = [], 0
    for text in texts:
        pieces = text.split(AUDIO)
        out = [pieces[0]]
        for piece in pieces[1:]:
            out += [replacements[k], piece]
            k += 1
        expanded.append("".join(out))
    return expanded


class BatchInputs(dict):
    """Model inputs as a dict (``model(**inputs)``) with attribute access and ``.to(device)``."""

    __getattr__ = dict.__getitem__

    def to(self, device) -> "BatchInputs":
        return BatchInputs({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


class Qwen2AudioProcessor:
    def __init__(self, tokenizer: Tokenizer, n_mels: int = 128, chat_template: str = CHAT_TEMPLATE,
                 padding_side: str = "left"):
        self.tokenizer = tokenizer
        self.n_mels = n_mels
        self.chat_template = chat_template
        self.padding_side = padding_side

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Qwen2AudioProcessor":
        directory = Path(path)
        tokenizer = Tokenizer.from_dir(directory)
        n_mels = 128
        pre = directory / PREPROCESSOR_FILE
        if pre.exists():
            try:
                cfg = json.loads(pre.read_text(encoding="utf-8"))
                n_mels, rate = int(cfg.get("feature_size", n_mels)), int(cfg.get("sampling_rate", SAMPLE_RATE))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
                raise Qwen2AudioError(f"{pre}: not a valid preprocessor config ({type(e).__name__}: {e})") from None
            if rate != SAMPLE_RATE:
                raise Qwen2AudioError(f"{pre}: sampling_rate must be {SAMPLE_RATE}")
        side = tokenizer.config.get("padding_side", "left")
        return cls(tokenizer, n_mels=n_mels, padding_side=side)

    def save_pretrained(self, path: str | Path) -> None:
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.config["padding_side"] = self.padding_side
        self.tokenizer.save(directory)
        pre = {
            "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": self.n_mels,
            "sampling_rate": SAMPLE_RATE, "hop_length": 160, "n_fft": 400, "chunk_length": 30,
            "n_samples": 480000, "nb_max_frames": 3000, "padding_side": "right", "padding_value": 0.0,
            "return_attention_mask": True, "dither": 0.0, "processor_class": "Qwen2AudioProcessor",
        }
        (directory / PREPROCESSOR_FILE).write_text(json.dumps(pre, indent=2) + "\n")
        (directory / "chat_template.json").write_text(json.dumps({"chat_template": self.chat_template}, indent=2) + "\n")

    # ---- text --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False):
        text, _ = render_chat(messages, add_generation_prompt)
        return self.tokenizer.encode(text) if tokenize else text

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    # ---- text + audio ------------------------------------------------------------------------
    def __call__(self, text: str | Sequence[str], audio: Any = None, audios: Any = None,
                 sampling_rate: int | None = None, padding: bool = True, return_tensors: str | None = "pt",
                 truncate: bool = False, device="cpu", **unused) -> BatchInputs:
        if audio is not None and audios is not None:
            raise Qwen2AudioError("pass audio through `audio=` or `audios=`, not both")
        audio = audios if audio is None else audio
        texts = [text] if isinstance(text, str) else list(text)
        if audio is None:
            clips = []
        elif isinstance(audio, (np.ndarray, torch.Tensor, tuple, str, bytes, Path)):
            clips = [audio]
        else:
            clips = list(audio)

        n_slots = sum(t.count(AUDIO) for t in texts)
        if n_slots != len(clips):
            raise AudioTokenMismatch(f"the text has {n_slots} {AUDIO} placeholder(s) but {len(clips)} audio(s) were given")

        windows, replacements, _ = decode_and_window(clips, sampling_rate, truncate)
        ids = self.tokenizer.encode_batch(expand_placeholders(texts, replacements))
        result = BatchInputs(self._pad(ids, padding))
        if windows:
            feats, mask = log_mel_spectrogram(windows, self.n_mels, device=device)
            result["input_features"], result["feature_attention_mask"] = feats, mask
        if return_tensors is None:
            return BatchInputs({k: v.tolist() for k, v in result.items()})
        return result

    def _pad(self, ids: list[list[int]], padding: bool) -> dict[str, torch.Tensor]:
        longest = max(len(x) for x in ids)
        if not padding and any(len(x) != longest for x in ids):
            raise Qwen2AudioError("prompts of different lengths need padding=True")
        input_ids = torch.full((len(ids), longest), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, seq in enumerate(ids):
            span = slice(longest - len(seq), longest) if self.padding_side == "left" else slice(0, len(seq))
            input_ids[row, span] = torch.tensor(seq, dtype=torch.long)
            mask[row, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    # ---- messages ----------------------------------------------------------------------------
    def prepare_chats(self, conversations: list[list[dict]], truncate: bool = False, device="cpu") -> BatchInputs:
        """Render conversations and build one batch of model inputs from their audio parts."""
        texts, clips = [], []
        for messages in conversations:
            text, sources = render_chat(messages)
            texts.append(text)
            clips.extend(sources)
        return self(texts, audio=clips or None, truncate=truncate, device=device)

    def prepare_raw(self, prompts: list[str], audio: list | None = None, truncate: bool = False, device="cpu"):
        return self(prompts, audio=audio, truncate=truncate, device=device)
