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


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """CTRL-style penalty as in the reference: divide positive, multiply negative logits of seen tokens.

    `seen` is a (B, V) boolean mask of tokens in the prompt or generated so far; `penalty` a number or a (B, 1)
    tensor of per-row penalties (1 leaves a row exactly as it is).
    """
    if isinstance(penalty, (int, float)) and penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                generators: list[torch.Generator | None], top_k_max: int = 0, need_top_p: bool = True,
                all_top_k: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampled token per row, every row with its own options, in batched tensor ops.

    logits (n, V) float32; temperature (n, 1) > 0; top_k (n, 1) long (0 = off) and its largest value (known on the
    host: no sync); top_p (n, 1), inf = off, and `need_top_p` False when every row's is off. The draw is by
    inverse CDF: one uniform number per row (a search in the row's cumulative probabilities), so a row with a
    generator draws one number from it alone (reproducible whatever else is in the batch: that draw is the only
    per-row op) and the others share one draw from the default generator. Returns tokens (n,) and ok (n,) bool:
    False where the row's probabilities are not finite (its token is then meaningless). `all_top_k`: every row
    has top_k > 0 (known on the host), so only each row's top_k_max best tokens are sorted and searched.
    """
    x = logits / temperature
    n, V = x.shape
    if all_top_k:  # every row keeps at most k_max tokens: work on those candidates only, sorted by topk
        x, order = x.topk(min(top_k_max, V))  # (n, k_max), descending
        x = x.masked_fill(torch.arange(x.shape[1], device=x.device)[None, :] >= top_k, float("-inf"))
        # (ties at the k-th value: topk keeps exactly k, where a full-row mask at the k-th value would keep all)
    else:
        order = None
        kth = None
        if top_k_max > 0:
            k_max = min(top_k_max, V)
            kth = torch.where(top_k > 0, x.topk(k_max).values.gather(1, top_k.clamp(1, k_max) - 1), float("-inf"))
            x = x.masked_fill(x < kth, float("-inf"))
    if need_top_p:
        if order is None:
            sorted_x, by = x.sort(dim=-1, descending=True)
        else:
            sorted_x, by = x, None  # already sorted
        probs = sorted_x.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        x = x.masked_fill(drop if by is None else torch.zeros_like(drop).scatter(-1, by, drop), float("-inf"))
    cdf = x.softmax(-1).cumsum(-1)
    total = cdf[:, -1:]
    ok = torch.isfinite(total[:, 0])  # a NaN or inf probability makes the row's total NaN
    u = torch.rand(n, 1, device=x.device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, generator=g, device=g.device)
    # strictly below the total, so the search never runs past the last token with probability > 0
    value = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    # (a broken row's search gives a meaningless token, in range, and fails no other row)
    picked = torch.searchsorted(cdf, value, right=True).clamp_(0, x.shape[1] - 1)
    return (picked if order is None else order.gather(1, picked))[:, 0], ok


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) float -> next token ids (B,), every row with the same options."""
    if params.greedy:
        return logits.argmax(-1)
    B = logits.shape[0]
    column = lambda v, dtype=torch.float32: torch.full((B, 1), v, dtype=dtype, device=logits.device)  # noqa: E731
    tokens, _ = sample_rows(logits.float(), column(params.temperature), column(params.top_k, torch.long),
                            column(params.top_p if params.top_p < 1 else float("inf")), [None] * B if generator is None
                            else [generator] * B, top_k_max=params.top_k, need_top_p=params.top_p < 1,
                            all_top_k=params.top_k > 0)
    return tokens


class Sampler:
    """Sampling state of rows 0..num_rows-1 and the batched token choice, shared by the static generate loop and
    the continuous-batching engine (so a request samples alike in both).

    Each row's options live in device tensors, set once when the row is given a request (`add`), so a step
    only slices (or indexes) its rows: greedy rows take the argmax, sampled rows go through batched
    temperature / top-k / top-p passes (`sample_rows`: one for the rows with a top-k, which sort only their k best
    tokens, one for the others), and a repetition penalty is one `where` over the penalised rows' seen masks."""

    def __init__(self, num_rows: int, vocab_size: int, device):
        self.device = torch.device(device)
        self.vocab_size = vocab_size
        self.params: list[SamplingParams | None] = [None] * num_rows
        self.generators: list[torch.Generator | None] = [None] * num_rows
        self.temperature = torch.ones(num_rows, 1, device=self.device)
        self.top_k = torch.zeros(num_rows, 1, dtype=torch.long, device=self.device)
        self.top_p = torch.full((num_rows, 1), float("inf"), device=self.device)
        self.penalty = torch.ones(num_rows, 1, device=self.device)
        self.seen: torch.Tensor | None = None  # (num_rows, V) bool, made when a row first asks for a penalty

    def add(self, row: int, params: SamplingParams, prompt_ids, generator: torch.Generator | None = None) -> None:
        """Give `row` a new request: its options, its own generator when seeded (`generator`: the one it had before
        a preemption, so it draws on where it stopped), the ids it has seen (prompt, plus answer so far)."""
        self.params[row] = params
        self.generators[row] = None
        if not params.greedy:
            if params.seed is not None:
                self.generators[row] = generator or torch.Generator(device=self.device).manual_seed(params.seed)
            self.temperature[row] = params.temperature
            self.top_k[row] = params.top_k
            self.top_p[row] = params.top_p if params.top_p < 1 else float("inf")
        self.penalty[row] = params.repetition_penalty
        if params.repetition_penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros(len(self.params), self.vocab_size, dtype=torch.bool, device=self.device)
        if self.seen is not None:
            self.seen[row] = False
            if params.repetition_penalty != 1.0:
                ids = torch.as_tensor(prompt_ids, dtype=torch.long).to(self.device)
                self.seen[row, ids[ids < self.vocab_size]] = True

    def sample(self, logits: torch.Tensor, rows: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits (B, V) float32 of `rows` (default 0..B-1, in any order) -> next tokens (B,) and ok (B,) bool (None
        when no row samples): False marks a row whose sampling failed (e.g. NaN probabilities); only its token is
        meaningless."""
        B = logits.shape[0]
        rows = list(range(B)) if rows is None else list(rows)
        contiguous = rows == list(range(rows[0], rows[0] + B))
        row_index = torch.tensor(rows, device=self.device)
        span = slice(rows[0], rows[0] + B) if contiguous else row_index  # a slice reads the state without a copy
        params = [self.params[r] for r in rows]
        penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if len(penalised) == B:
            logits = apply_repetition_penalty(logits, self.seen[span], self.penalty[span])
        elif penalised:  # only those rows: a full (B, V) pass would cost more than the sampling itself on a CPU
            idx = torch.tensor(penalised, device=self.device)
            logits = logits.clone()
            logits[idx] = apply_repetition_penalty(logits[idx], self.seen[row_index[idx]], self.penalty[row_index[idx]])
        tokens = logits.argmax(-1)
        ok = None
        # Sampled rows in two batches: those with a top-k sort only their k best tokens, the others the vocabulary.
        for batch in ([i for i, p in enumerate(params) if not p.greedy and p.top_k > 0],
                      [i for i, p in enumerate(params) if not p.greedy and p.top_k == 0]):
            if not batch:
                continue
            pick = slice(0, B) if len(batch) == B else torch.tensor(batch, device=self.device)
            at = span if len(batch) == B else row_index[pick]
            sampled, row_ok = sample_rows(logits[pick], self.temperature[at], self.top_k[at], self.top_p[at],
                                          [self.generators[rows[i]] for i in batch],
                                          top_k_max=max(params[i].top_k for i in batch),
                                          need_top_p=any(params[i].top_p < 1 for i in batch),
                                          all_top_k=params[batch[0]].top_k > 0)
            tokens[pick] = sampled
            if ok is None:
                ok = torch.ones(B, dtype=torch.bool, device=self.device)
            ok[pick] = row_ok
        if self.seen is not None:
            self.seen[row_index, tokens] = True
        return tokens, ok


def token_logprobs(logits: torch.Tensor, rows: list[int], ks: list[int], tokens: list[int]) -> list[tuple]:
    """For each row in `rows` (of logits (B, V), the model's distribution before any sampling transform): the
    chosen token's (id, logprob, [(alt_id, alt_logprob)] * k), k = `ks[j]`, with one host sync for them all."""
    idx = torch.tensor(rows, device=logits.device)
    lp = logits[idx].log_softmax(-1)
    chosen = lp.gather(1, torch.tensor([tokens[i] for i in rows], device=logits.device)[:, None])[:, 0]
    k_max = max(ks)
    if k_max:
        top = lp.topk(k_max)
        chosen_host, ids, values = chosen.tolist(), top.indices.tolist(), top.values.tolist()
    else:
        chosen_host, ids, values = chosen.tolist(), [[]] * len(rows), [[]] * len(rows)
    return [(tokens[i], c, list(zip(ids[j][:k], values[j][:k])))
            for j, (i, k, c) in enumerate(zip(rows, ks, chosen_host))]
