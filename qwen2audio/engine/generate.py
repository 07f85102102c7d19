"""Stepping the engine in the caller's thread, and `generate_steps`: the engine's output as one token per row per step.

There is one generation stack, the continuous-batching engine (llm_engine.py). The Python API (api.py's `Pipeline`)
steps it with `step_until` in whichever thread waits; `generate_steps` is the same loop for the tests and benchmarks
that read tokens rather than text: it submits a batch of prompts and yields step k once every unfinished row has
its k-th token. Rows advance through the engine at their own pace (prompts are admitted and chunked by the
scheduler), so a step may take several engine steps to fill, and a row's tokens are the ones it gets alone.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator

from ..model.qwen2_audio import Qwen2AudioModel
from .inputs import PromptInputs
from .llm_engine import LLMEngine
from .sampling import SamplingParams
from .scheduler import FINISHED, Output, PromptTooLong, Sequence


@dataclass
class StepOutput:
    tokens: list[int | None]  # the new token of each row, None for rows already finished
    finished: list[bool]  # the row has no more tokens after this step


def check_positions(model: Qwen2AudioModel, prompt_lens: list[int], max_new_tokens: int) -> None:
    """PromptTooLong when the longest prompt plus the tokens asked for exceed the model's positions (an engine's own
    limit, checked at submission, may be lower: its KV cache)."""
    limit = model.config.text_config.max_position_embeddings
    longest = max(prompt_lens, default=0)
    if longest + max_new_tokens > limit:
        raise PromptTooLong(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                            f"{limit} positions")


def step_until(engine: LLMEngine, done: Callable[[], bool], lock: threading.Lock | None = None) -> None:
    """Step the engine in this thread until `done()`. Threads sharing an engine pass one lock: whoever waits steps
    it, one step at a time, advancing every thread's requests."""
    while not done():
        with lock if lock is not None else nullcontext():
            if done():
                return
            if not engine.scheduler.has_work():
                raise RuntimeError("the engine has no work left, but the requests waited for are not finished")
            engine.step()


def raise_if_failed(seq: Sequence) -> None:
    """A request that finished with an error raises it: its own exception (e.g. its audio), else RuntimeError."""
    if seq.finish_reason == "error":
        if seq.exception is not None:
            raise seq.exception
        raise RuntimeError(seq.error)


def generate_steps(engine: LLMEngine, prompts: list[PromptInputs], params: SamplingParams, *,
                   ignore_eos: bool = False, lock: threading.Lock | None = None) -> Iterator[StepOutput]:
    """Submit `prompts` to `engine` and yield each step's new tokens, stepping the engine in this thread.

    A row that ends on a stop id (the engine's, or `params.stop_token_ids`; none with `ignore_eos`) yields None for
    it, finished; a row that ends by length or on a stop string yields its last token, finished. `lock`: the one
    the threads sharing `engine` step it under (`step_until`). Closing the iterator early cancels the rows still
    running (the engine's next step frees them). Raises PromptTooLong when a prompt does not fit."""
    check_positions(engine.model, [len(p.ids) for p in prompts], params.max_new_tokens)
    tokens: list[list[int]] = [[] for _ in prompts]
    ends: list[int | None] = [None] * len(prompts)  # a finished row's token count

    def sink(i: int) -> Callable[[Output], None]:
        def put(out: Output) -> None:
            tokens[i].extend(out.token_ids)
            if out.finished:
                ends[i] = len(tokens[i])
        return put

    seqs: list[Sequence] = []
    try:
        for i, p in enumerate(prompts):
            seqs.append(engine.submit(p, params, sink=sink(i), ignore_eos=ignore_eos))
        k = 0
        while not all(e is not None and e <= k for e in ends):
            step_until(engine, lambda: all(len(t) > k or e is not None for t, e in zip(tokens, ends)), lock)
            for seq in seqs:
                raise_if_failed(seq)
            yield StepOutput(tokens=[t[k] if len(t) > k else None for t in tokens],
                             finished=[e is not None and e <= k + 1 for e in ends])
            k += 1
    finally:
        for seq in seqs:
            if seq.status != FINISHED:
                engine.cancel(seq)
