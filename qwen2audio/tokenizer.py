"""Qwen2 byte-level BPE through the `tokenizers` library, plus the special tokens Qwen2-Audio uses.

Special-token ids are looked up by name in the loaded vocabulary, never assumed, so a model trained
with a different (e.g. small) vocabulary works the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .errors import Qwen2AudioError

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
AUDIO = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, AUDIO, AUDIO_BOS, AUDIO_EOS)

# Qwen2's pre-tokenizer: contractions, letters, single digits, punctuation runs, newlines, spaces.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as one printable character (the vocab's spelling)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


class TokenizerError(Qwen2AudioError):
    """A tokenizer directory that cannot be loaded or lacks a token Qwen2-Audio needs."""


def _qwen2_pipeline(bpe: models.BPE) -> HFTokenizer:
    tok = HFTokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


class Tokenizer:
    """Thin wrapper over a `tokenizers.Tokenizer` that knows Qwen2-Audio's special tokens."""

    def __init__(self, backend: HFTokenizer, config: dict | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.ids = {name: self._require(name) for name in SPECIAL_TOKENS}
        self.endoftext_id = self.ids[ENDOFTEXT]
        self.im_start_id = self.ids[IM_START]
        self.im_end_id = self.ids[IM_END]
        self.audio_id = self.ids[AUDIO]
        self.audio_bos_id = self.ids[AUDIO_BOS]
        self.audio_eos_id = self.ids[AUDIO_EOS]
        pad = self.config.get("pad_token") or ENDOFTEXT
        self.pad_id = self._require(pad if isinstance(pad, str) else pad["content"])

    def _require(self, token: str) -> int:
        tid = self.backend.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"the tokenizer has no {token!r} token, which Qwen2-Audio needs")
        return tid

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        config_path = directory / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{config_path}: not valid JSON ({e})") from None
        if (directory / "tokenizer.json").exists():
            try:
                backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as e:  # the tokenizers library raises a bare Exception on bad files
                raise TokenizerError(f"{directory / 'tokenizer.json'}: cannot be loaded ({e})") from None
        elif (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
            try:
                backend = cls._from_vocab_merges(directory, config)
            except (ValueError, KeyError, TypeError) as e:
                raise TokenizerError(f"{directory}: vocab.json/merges.txt cannot be loaded ({e})") from None
        else:
            raise TokenizerError(f"{directory}: no tokenizer.json, nor vocab.json + merges.txt")
        return cls(backend, config)

    @staticmethod
    def _from_vocab_merges(directory: Path, config: dict) -> HFTokenizer:
        vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
        merges = []
        for line in (directory / "merges.txt").read_text(encoding="utf-8").splitlines():
            if line and not line.startswith("#version"):
                left, right = line.split(" ")
                merges.append((left, right))
        added = {int(i): t["content"] for i, t in config.get("added_tokens_decoder", {}).items()}
        for name in SPECIAL_TOKENS:  # released checkpoints list them in added_tokens_decoder
            if name not in added.values() and name not in vocab:
                added[len(vocab) + len(added)] = name
        # Putting specials in the vocab first pins their ids; add_special_tokens then reuses them.
        vocab.update({content: tid for tid, content in added.items()})
        backend = _qwen2_pipeline(
            models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, continuing_subword_prefix="", end_of_word_suffix="")
        )
        backend.add_special_tokens([AddedToken(added[i], special=True, normalized=False) for i in sorted(added)])
        return backend

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        added = {
            str(tid): {"content": tok.content, "special": True, "lstrip": False, "rstrip": False,
                       "normalized": False, "single_word": False}
            for tid, tok in sorted(self.backend.get_added_tokens_decoder().items())
        }
        config = {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": ENDOFTEXT,
            "pad_token": ENDOFTEXT,
            "unk_token": None,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "model_max_length": 32768,
            **{k: v for k, v in self.config.items() if k not in ("added_tokens_decoder",)},
            "added_tokens_decoder": added,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train a small Qwen2-style byte-level BPE that keeps the Qwen special tokens (tests, small models)."""
        backend = _qwen2_pipeline(models.BPE(fuse_unk=False, byte_fallback=False))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        backend.train_from_iterator(texts, trainer=trainer)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        return cls(backend)

    # ---- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one id stands for (a piece of a UTF-8 character, possibly), as OpenAI's logprobs give."""
        token = self.backend.id_to_token(token_id)
        if token is None:
            return b""
        if token_id in self._special_ids:
            return token.encode()
        return bytes(_BYTE_OF_CHAR.get(c, 0) for c in token)  # byte-level BPE: one char per byte

    @property
    def _special_ids(self) -> set[int]:
        if getattr(self, "_specials", None) is None:
            self._specials = set(self.backend.get_added_tokens_decoder())
        return self._specials

    @property
    def max_token_chars(self) -> int:
        """The most characters one token can cover (its bytes, in the byte-level alphabet), so that a text of
        n characters has at least n / max_token_chars tokens: a length check that needs no tokenising."""
        if getattr(self, "_max_chars", None) is None:
            self._max_chars = max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)
        return self._max_chars

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive, holding back incomplete UTF-8 sequences.

    `tokenizers.decoders.DecodeStream` decodes only a short window of recent ids per step (re-decoding every id
    on every token cost 1.7 s for 4,096 tokens). The pieces always concatenate to `decode(all ids)`: a piece is
    handed out only when the text does not end in U+FFFD, i.e. at a complete character, and byte-level decoding
    of what follows such a point does not depend on what came before it."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._backend = tokenizer.backend
        self.ids: list[int] = []  # every id pushed (for the fallback below)
        self.pending: list[int] = []  # ids since the last piece handed out
        self._stream: decoders.DecodeStream | None = decoders.DecodeStream(skip_special_tokens=skip_special_tokens)
        self._emitted = ""  # only used after a fallback

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        if self._stream is None:
            return self._push_slow()
        self.pending.append(token_id)
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception:  # a decoder whose window text does not extend its prefix: decode everything instead
            self._stream = None
            self._emitted = self.tokenizer.decode(self.ids[: len(self.ids) - len(self.pending)], self.skip_special_tokens)
            return self._push_slow()
        if piece is None:
            return ""
        self.pending.clear()
        return piece

    def _push_slow(self) -> str:
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece, self._emitted = text[len(self._emitted):], text
        return piece

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD, as in `decode`)."""
        if self._stream is None:
            text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
            piece, self._emitted = text[len(self._emitted):], text
            return piece
        piece = self.tokenizer.decode(self.pending, self.skip_special_tokens) if self.pending else ""
        self.pending.clear()
        self._stream = decoders.DecodeStream(skip_special_tokens=self.skip_special_tokens)
        return piece
