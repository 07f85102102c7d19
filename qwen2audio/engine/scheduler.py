"""Request state and the scheduler: which requests run, and which of their tokens each step computes.

A request's tokens are its prompt followed by its generated ids; `num_computed` of them have keys and values in
the paged KV cache (its `block_table`, block_manager.py). Every step is planned here:

- decode: every running request whose prompt is done feeds its last sampled token. Each needs a cache slot for it;
  when the free blocks run out, the most recently admitted request is preempted: its blocks are freed and it goes
  back to the front of the queue, to be recomputed (prompt + what it generated so far) when blocks free up. Its
  answer continues exactly where it stopped: greedy or seeded, the same tokens as without the interruption.
- prefill: requests still in their prompt get a chunk of it, then waiting requests are admitted in arrival order
  while rows, blocks and the step's token budget last. Admission first looks the prompt's full blocks up in the
  prefix cache: the blocks found are shared and skipped, only the rest is computed. While other requests decode,
  a step computes at most `chunk_tokens` prompt tokens, so one long prompt never stalls them for long; with nobody
  decoding, a prompt goes in one piece (chunks would only add passes).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..errors import Qwen2AudioError
from .block_manager import BlockManager, hashes_of
from .inputs import PromptInputs
from .sampling import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class QueueFull(RuntimeError):
    """The waiting queue is at its limit: the client should retry later (HTTP 429)."""


class PromptTooLong(Qwen2AudioError):
    """Prompt + requested tokens do not fit the context limit or the KV cache (HTTP 400)."""


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
    row: int | None = None  # the Sampler row holding its sampling state while admitted
    token_ids: list[int] = field(default_factory=list)  # prompt ids + generated ids (set in __post_init__)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    prefilled: bool = False  # its prompt (after a preemption: prompt + answer so far) is computed
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks so far
    audio_runs: list = field(default_factory=list)  # (start, stop, window key) per audio window
    audio_embeds: dict | None = None  # window index -> its embeddings (N, D), while its prompt is being computed
    generator: object = None  # a seeded request's torch.Generator: survives preemption
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied at its (last) admission
    last_token: int = -1  # the sampled token the next decode step feeds in
    output_ids: list[int] = field(default_factory=list)
    num_sampled: int = 0  # completion tokens: output ids plus a final stop id
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    exception: BaseException | None = None  # what made it fail, for callers that re-raise it (the Python API)
    answer: object = None  # detokenize.Detokenizer: the streamed text, cut at a stop string
    step_logprobs: tuple | None = None  # the last sampled token's (id, logprob, top alternatives), when asked
    outputs: object = None  # queue.Queue of Outputs when submitted without a sink

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt.ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.ids)

    @property
    def pos(self) -> int:
        """Tokens held in the KV cache."""
        return self.num_computed

    def cancel(self) -> None:
        """Ask the engine to drop this request; its blocks are freed at the next step."""
        self.cancelled = True


@dataclass
class Chunk:
    """Tokens start..stop-1 of a request, computed in one prefill pass; `last` when they end its prompt."""

    seq: Sequence
    start: int
    stop: int

    @property
    def last(self) -> bool:
        return self.stop == len(self.seq.token_ids)


@dataclass
class StepPlan:
    prefill: list[Chunk]
    decode: list[Sequence]  # each feeds its last token
    preempted: list[Sequence]


class Scheduler:
    def __init__(self, max_rows: int, max_len: int, max_queue: int, prefill_token_budget: int,
                 blocks: BlockManager, chunk_tokens: int = 512, prefix_caching: bool = True):
        self.max_rows = max_rows
        self.max_len = max_len
        self.max_queue = max_queue
        self.prefill_token_budget = prefill_token_budget  # prompt tokens per step while nobody decodes
        self.chunk_tokens = chunk_tokens  # prompt tokens per step while others decode
        self.blocks = blocks
        self.prefix_caching = prefix_caching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted (prefilling or decoding), in admission order
        self.free_rows = list(range(max_rows - 1, -1, -1))  # popped from the end: row 0 first
        self.lock = threading.Lock()  # guards `waiting` against submitting threads

    @property
    def num_slots(self) -> int:
        return self.max_rows

    # ---- called from request threads --------------------------------------------------------
    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        if prompt_len >= self.max_len:
            raise PromptTooLong(f"the prompt has {prompt_len} tokens; this server's context limit is "
                                f"{self.max_len} tokens (prompt + answer)")
        if prompt_len + max_tokens > self.max_len:
            raise PromptTooLong(f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together "
                                f"more than this server's context limit of {self.max_len} tokens; "
                                f"ask for at most {self.max_len - prompt_len} tokens")
        room = len(self.blocks.blocks) * self.blocks.block_size
        if prompt_len + max_tokens > room:
            raise PromptTooLong(f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}: together "
                                f"more than this server's whole KV cache ({room} tokens); "
                                f"ask for at most {max(room - prompt_len, 0)} tokens")

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

    def schedule(self) -> StepPlan:
        preempted = self._make_room_for_decode()
        decode = [s for s in self.running if s.prefilled]
        budget = self.chunk_tokens if decode else self.prefill_token_budget
        prefill = []
        for seq in self.running:  # prompts already under way come first
            if not seq.prefilled and budget > 0:
                n = min(len(seq.token_ids) - seq.num_computed, budget)
                prefill.append(Chunk(seq, seq.num_computed, seq.num_computed + n))
                budget -= n
        while budget > 0 and self.free_rows:
            seq = self._admit_next(reserve=len(self.running))
            if seq is None:
                break
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            prefill.append(Chunk(seq, seq.num_computed, seq.num_computed + n))
            budget -= n
        return StepPlan(prefill, decode, preempted)

    def _make_room_for_decode(self) -> list[Sequence]:
        """A cache slot for every decoding request's next token, preempting the latest admitted when short."""
        preempted = []
        for seq in list(self.running):
            if not seq.prefilled or seq.status != RUNNING:
                continue
            while not self.blocks.grow(seq.block_table, seq.num_computed + 1):
                victim = self.running[-1]
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
        return preempted

    def _admit_next(self, reserve: int) -> Sequence | None:
        """The first waiting request, with its block table, when its uncached blocks fit beside `reserve` blocks
        kept for the running requests' next tokens."""
        with self.lock:
            if not self.waiting:
                return None
            seq = self.waiting[0]
            bs = self.blocks.block_size
            full = len(seq.token_ids) // bs
            if len(seq.block_hashes) < full:
                previous = seq.block_hashes[-1] if seq.block_hashes else None
                seq.block_hashes += hashes_of(seq.token_ids, seq.audio_runs, bs, len(seq.block_hashes), full, previous)
            # at least the last token is computed: its logits choose the next one
            cached = []
            if self.prefix_caching:
                cached = self.blocks.cached_prefix(seq.block_hashes[: (len(seq.token_ids) - 1) // bs])
            need = self.blocks.new_blocks_needed(cached, len(seq.token_ids))
            if need + (reserve if self.running else 0) > self.blocks.num_free:
                return None
            self.waiting.popleft()
        seq.block_table = self.blocks.allocate(cached, len(seq.token_ids))
        seq.num_computed = seq.cached_tokens = len(cached) * bs
        if seq.preemptions == 0:
            self.blocks.queried_tokens += seq.prompt_len
            self.blocks.hit_tokens += seq.cached_tokens
        seq.status, seq.prefilled, seq.row = RUNNING, False, self.free_rows.pop()
        self.running.append(seq)
        return seq

    def computed(self, seq: Sequence, stop: int) -> None:
        """Tokens up to `stop` now have keys/values: register the blocks this filled for the prefix cache."""
        bs = self.blocks.block_size
        done_before = seq.num_computed // bs
        seq.num_computed = stop
        full = stop // bs
        if full > done_before:
            if len(seq.block_hashes) < full:
                previous = seq.block_hashes[-1] if seq.block_hashes else None
                seq.block_hashes += hashes_of(seq.token_ids, seq.audio_runs, bs, len(seq.block_hashes), full, previous)
            self.blocks.register(seq.block_table, seq.block_hashes[:full], done_before)

    def preempt(self, seq: Sequence) -> None:
        """Free a running request's blocks and row; it waits at the queue's front to be recomputed."""
        self._leave(seq)
        seq.status, seq.prefilled, seq.num_computed = WAITING, False, 0
        seq.preemptions += 1
        with self.lock:
            self.waiting.appendleft(seq)

    def release(self, seq: Sequence) -> None:
        """Take a finished request out, freeing its blocks and row."""
        if seq.status == RUNNING:
            self._leave(seq)
        seq.status = FINISHED

    def _leave(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        self.free_rows.append(seq.row)
        seq.row, seq.audio_embeds = None, None

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def free_slots(self) -> int:
        return len(self.free_rows)
