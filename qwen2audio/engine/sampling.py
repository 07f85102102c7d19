"""Sampling parameters and the per-step token choice (greedy or sampled), batched over rows."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from ..errors import Qwen2AudioError

# A repetition penalty divides or multiplies logits: outside this range a logit of ~30 overflows float32 or
# flattens to 0, and sampling then sees inf/NaN probabilities. 0.01..100 is far wider than any useful value (1-2).
REPETITION_PENALTY_RANGE = (0.01, 100.0)
GREEDY_BELOW = 1e-5  # temperatures under this are treated as 0 (greedy)
MAX_LOGPROBS = 20  # most alternatives per token, as OpenAI's top_logprobs


class SamplingError(Qwen2AudioError):
    """A sampling option out of its range."""


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings, cut from the answer
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop ids besides the model's eos
    # None: no log-probabilities; k >= 0: each generated token's log-probability and its k most likely
    # alternatives, from the model's distribution before any sampling transform (as vLLM's default).
    logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        lo, hi = REPETITION_PENALTY_RANGE
        checks = [  # (field, valid, what a valid value is)
            ("max_new_tokens", _int(self.max_new_tokens) and self.max_new_tokens >= 1, "an integer >= 1"),
            ("temperature", _real(self.temperature) and self.temperature >= 0, "a finite number >= 0"),
            ("top_p", _real(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("top_k", _int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            ("repetition_penalty", _real(self.repetition_penalty) and lo <= self.repetition_penalty <= hi,
             f"a number in [{lo:g}, {hi:g}] (1 = off)"),
            ("seed", self.seed is None or (_int(self.seed) and -(2**63) <= self.seed < 2**63), "a 64-bit integer"),
            ("stop", isinstance(self.stop, list) and all(isinstance(t, str) and t for t in self.stop),
             "a list of non-empty strings"),
            ("stop_token_ids", all(_int(t) and t >= 0 for t in self.stop_token_ids), "a list of token ids"),
            ("logprobs", self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"None or an integer in [0, {MAX_LOGPROBS}]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise SamplingError(f"{name} must be {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        # logits / 1e-40 overflow to inf (NaN probabilities): temperatures this small mean greedy anyway
        return self.temperature < GREEDY_BELOW


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty as in the reference: divide positive, multiply negative logits of seen tokens.

    `seen` is a (B, V) boolean mask of tokens in the prompt or generated so far.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) float -> next token ids (B,)."""
    if params.greedy:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
