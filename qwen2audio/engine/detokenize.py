"""Per-request detokenisation: generated ids -> streamed text, cut at the first stop string.

Every surface (the Python API's static batches and streams, the server's engine) turns ids into text here, so
they cut and stream alike. The work per token is constant: ids are decoded incrementally (`StreamDecoder`, on
`tokenizers.decoders.DecodeStream`) and stop strings are searched only in the text not yet handed out, which is
the new piece plus at most the longest stop string's length - 1 of held-back characters.
"""

from __future__ import annotations

import re

from ..tokenizer import Tokenizer


class Detokenizer:
    """One row's text. `push(id)` returns the piece that can be shown now; `flush()` the rest at the end.

    A tail that could be the start of a stop string is held back until it is known not to be one, so no part
    of a stop string is ever shown. The pieces concatenate to `decode(ids)` cut before its first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.decoder = tokenizer.stream_decoder()
        self.stop = [s for s in stop if s]
        # One C-level search per token for the common case: the leftmost stop string, and whether any stop
        # string's first character occurs in the last (longest - 1) characters at all.
        self._any_stop = re.compile("|".join(map(re.escape, self.stop))) if self.stop else None
        self._any_start = re.compile("[" + "".join(re.escape(s[0]) for s in self.stop) + "]") if self.stop else None
        self._longest = max(map(len, self.stop), default=0)
        self.parts: list[str] = []  # the pieces handed out
        self.held = ""  # decoded but not handed out: a possible stop-string start
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything decoded so far, cut at a stop string."""
        return "".join(self.parts) + self.held

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._take(self.held + self.decoder.push(token_id), final=False)

    def flush(self) -> str:
        """End of generation: release the decoder's held-back bytes and any held stop-string prefix."""
        if self.stopped:
            return ""
        return self._take(self.held + self.decoder.flush(), final=True)

    def _take(self, unsent: str, final: bool) -> str:
        keep = 0
        if self.stop:
            # No stop string can start before `unsent`: what was handed out had no end that begins one.
            found = self._any_stop.search(unsent)
            if found is not None:
                self.stopped = True
                unsent = unsent[: found.start()]
            elif not final and self._any_start.search(unsent, max(0, len(unsent) - self._longest + 1)):
                keep = self._stop_prefix(unsent)
        if keep:
            piece, self.held = unsent[:-keep], unsent[-keep:]
        else:
            piece, self.held = unsent, ""
        if piece:
            self.parts.append(piece)
        return piece

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            # candidate starts: where s's first character occurs within the last len(s) - 1 characters
            i = text.find(s[0], max(0, len(text) - len(s) + 1))
            while i != -1 and len(text) - i > longest:
                if s.startswith(text[i:]):
                    longest = len(text) - i
                    break
                i = text.find(s[0], i + 1)
        return longest
