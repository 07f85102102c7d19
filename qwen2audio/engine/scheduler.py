"""Request state and the continuous-batching scheduler.

The KV cache has `num_slots` rows of `max_len` positions each. A running request owns one row, and
the running requests always occupy rows 0..B-1 in order: when one finishes, the last row's request
moves into its place (the engine copies that row's keys/values once), so a decode step reads a
contiguous prefix of the cache instead of gathering rows on every step.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..errors import Qwen2AudioError
from .inputs import PromptInputs
from .sampling import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class QueueFull(RuntimeError):
    """The waiting queue is at its limit: the client should retry later (HTTP 429)."""


class PromptTooLong(Qwen2AudioError):
    """Prompt + requested tokens do not fit one KV-cache slot (HTTP 400)."""


@dataclass
class Output:
    """What a request's consumer receives after each step that changed it."""

    request_id: str
    text: str  # new text since the previous Output (stop strings already cut)
    token_ids: list[int]  # new generated ids
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # with SamplingParams.logprobs: one (token_id, logprob, [(alt_id, alt_logprob), ...]) per id in token_ids
    logprobs: list | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt: PromptInputs
    params: SamplingParams
    stop_ids: frozenset[int]
    sink: Callable[[Output], None]
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    arrival: float = field(default_factory=time.perf_counter)
    status: str = WAITING
    cancelled: bool = False
    row: int | None = None
    pos: int = 0  # tokens held in the KV cache row
    last_token: int = -1  # the sampled token the next decode step feeds in
    output_ids: list[int] = field(default_factory=list)
    num_sampled: int = 0  # completion tokens: output ids plus a final stop id
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    # made at admission (the sampling state lives in the engine's Sampler, in this request's row)
    answer: object = None  # detokenize.Detokenizer: the streamed text, cut at a stop string
    step_logprobs: tuple | None = None  # the last sampled token's (id, logprob, top alternatives), when asked
    outputs: object = None  # queue.Queue of Outputs when submitted without a sink

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.ids)

    def cancel(self) -> None:
        """Ask the engine to drop this request; its slot is freed at the next step."""
        self.cancelled = True


class Scheduler:
    def __init__(self, num_slots: int, max_len: int, max_queue: int, prefill_token_budget: int):
        self.num_slots = num_slots
        self.max_len = max_len
        self.max_queue = max_queue
        self.prefill_token_budget = prefill_token_budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index == KV-cache row
        self.lock = threading.Lock()  # guards `waiting` against submitting threads

    # ---- called from request threads --------------------------------------------------------
    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len >= self.max_len:
            raise PromptTooLong(f"the prompt has {prompt_len} tokens; this server's context limit is "
                                f"{self.max_len} tokens (prompt + answer)")
        if prompt_len + max_tokens > self.max_len:
            raise PromptTooLong(f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together "
                                f"more than this server's context limit of {self.max_len} tokens; "
                                f"ask for at most {self.max_len - prompt_len} tokens")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq.prompt_len, seq.params.max_new_tokens)
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} waiting requests); retry later")
            self.waiting.append(seq)

    # ---- called from the engine thread ------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def take_cancelled_waiting(self) -> list[Sequence]:
        with self.lock:
            gone = [s for s in self.waiting if s.cancelled]
            if gone:
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
        return gone

    def admit(self) -> list[Sequence]:
        """Waiting requests that get a free row now, in arrival order, within the prefill budget
        (at least one, so a prompt longer than the budget still runs)."""
        admitted, tokens = [], 0
        with self.lock:
            while self.waiting and len(self.running) < self.num_slots:
                seq = self.waiting[0]
                if admitted and tokens + seq.prompt_len > self.prefill_token_budget:
                    break
                self.waiting.popleft()
                seq.status, seq.row = RUNNING, len(self.running)
                self.running.append(seq)
                admitted.append(seq)
                tokens += seq.prompt_len
        return admitted

    def release(self, seq: Sequence) -> tuple[int, int] | None:
        """Take a running request out. Returns (from_row, to_row) when the last row moved into the
        freed one (the caller copies that row's KV), else None."""
        row, last = seq.row, len(self.running) - 1
        assert self.running[row] is seq
        moved = None
        if row != last:
            mover = self.running[last]
            self.running[row], mover.row = mover, row
            moved = (last, row)
        self.running.pop()
        seq.row, seq.status = None, FINISHED
        return moved

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def free_slots(self) -> int:
        return self.num_slots - len(self.running)
