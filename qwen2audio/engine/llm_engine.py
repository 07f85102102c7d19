"""Continuous-batching engine: requests join and leave the running batch at every step.

`step()` = schedule -> run -> postprocess, driven by the engine's own thread (`start()`, the server) or by the
caller's thread (generate.py's `step_until`: the Python API, `generate_steps`):

- schedule (scheduler.py): drop cancelled requests, make room in the paged KV cache for every decoding request's
  next token (preempting the latest admitted when blocks run out), then plan prompt chunks: prompts under way
  first, then waiting requests admitted under the KV block budget, their cached prefix blocks shared
  (block_manager.py). While others decode, a step takes a bounded chunk of prompt tokens;
- run (model_runner.py): the prompt chunks (their audio encodings from the encoded-audio cache when the same
  window was seen before; on a GPU the chunks of one step in one right-padded batch, on a CPU each alone, where a
  batch only delays the first ones' first tokens), then one batched decode step over every decoding request,
  each at its own position, each attending over its own blocks only;
- postprocess: sample every row with its own parameters in one batched pass (`Sampler`), stream text to its
  consumer (`Detokenizer`), and free the blocks of finished requests at once.

This class owns the request lifecycle, the thread and the statistics.

A request's greedy answer equals the one it gets alone: its prompt attends only to its own tokens (or to cached
blocks that hold exactly the keys and values those tokens give), and a decode row never sees another's keys.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from typing import Callable, Iterator

import torch

from ..errors import Qwen2AudioError
from ..model.qwen2_audio import Qwen2AudioModel
from ..tokenizer import Tokenizer
from .detokenize import Detokenizer
from .inputs import PromptInputs
from .block_manager import BlockManager, audio_runs
from .kv_cache import BLOCK_SIZE
from .model_runner import ModelRunner, kv_bytes_per_token
from .sampling import Sampler, SamplingParams, token_logprobs
from .scheduler import FINISHED, RUNNING, Chunk, Output, Scheduler, Sequence

log = logging.getLogger("qwen2audio.engine")

COUNTERS = ("steps", "prefills", "prefill_chunks", "decode_steps", "prompt_tokens", "prompt_tokens_cached",
            "generated_tokens", "peak_running", "preemptions", "audio_windows_encoded", "finished_stop",
            "finished_length", "finished_cancelled", "finished_error")


class LLMEngine:
    def __init__(self, model: Qwen2AudioModel, tokenizer: Tokenizer, stop_ids: set[int], *, max_batch: int = 16,
                 max_model_len: int | None = None, kv_cache_bytes: int | None = None, max_queue: int = 256,
                 prefill_token_budget: int = 4096, chunk_tokens: int = 512, block_size: int = BLOCK_SIZE,
                 num_blocks: int | None = None, audio_cache_bytes: int = 256 * 2**20, n_mels: int | None = None,
                 batch_prefill: bool | None = None, prefix_caching: bool | None = None):
        """`max_batch` requests run at once; the KV cache holds `num_blocks` blocks of `block_size` tokens (default:
        what `kv_cache_bytes` holds, or else max_batch full-length requests, the memory the fixed rows took).
        `prefix_caching` (default: on unless a layer declares `batch_invariant = False`, as quantised ones do, whose
        results depend on the rows computed together) lets prompts share cached blocks."""
        if max_batch < 1:
            raise Qwen2AudioError("max_batch must be >= 1")
        self.model = model.eval()
        # None: batch the prefills on CUDA, where 16 batch-1 prefills in a row made the 7B's first tokens 3.6x later
        # than a transformers static batch's (benchmarks/README.md); on a CPU a batch saves no work.
        self.batch_prefill = model.device.type == "cuda" if batch_prefill is None else batch_prefill
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.n_mels = n_mels or model.config.audio_config.num_mel_bins
        limit = model.config.text_config.max_position_embeddings
        self.max_len = min(max_model_len or min(limit, 4096), limit)
        per_block = kv_bytes_per_token(model) * block_size
        if num_blocks is None:  # by default, whole blocks for max_batch requests of the full length
            num_blocks = (int(kv_cache_bytes // per_block) if kv_cache_bytes is not None
                          else max_batch * -(-self.max_len // block_size))
        if num_blocks * block_size < self.max_len:
            raise Qwen2AudioError(f"a KV cache of {num_blocks * per_block / 2**30:.3f} GiB ({num_blocks} blocks of "
                                  f"{block_size} tokens) holds no request of {self.max_len} tokens: raise the budget "
                                  f"or lower the maximum model length")
        # Every key exists from the start, so that stats() readers on other threads never see the dict grow.
        self.counters: Counter = Counter(dict.fromkeys(COUNTERS, 0))
        self.runner = ModelRunner(model, num_blocks, block_size, max_batch, self.max_len, self.counters,
                                  audio_cache_bytes, self.n_mels)
        self.sampler = Sampler(max_batch, model.config.text_config.vocab_size, model.device)
        self.blocks = BlockManager(num_blocks, block_size)
        if prefix_caching is None:
            prefix_caching = all(getattr(m, "batch_invariant", True) for m in model.modules())
        self.scheduler = Scheduler(max_batch, self.max_len, max_queue, prefill_token_budget, self.blocks,
                                   chunk_tokens=chunk_tokens, prefix_caching=prefix_caching)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- public API (any thread) ------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.scheduler.max_rows

    # the runner's parts, as they were before it was split out
    kv_cache_bytes = property(lambda self: self.runner.kv_cache_bytes)
    graphs = property(lambda self: self.runner.graphs)
    audio_cache = property(lambda self: self.runner.audio_cache)

    def submit(self, prompt: PromptInputs, params: SamplingParams, sink: Callable[[Output], None] | None = None,
               ignore_eos: bool = False, request_id: str | None = None, arrival: float | None = None) -> Sequence:
        """Queue a request. Raises PromptTooLong or QueueFull. Without a `sink`, outputs go to
        `seq.outputs` (a queue.Queue; see `iter_outputs`)."""
        outputs = None
        if sink is None:
            outputs = queue.Queue()
            sink = outputs.put
        stops = frozenset() if ignore_eos else self.stop_ids | set(params.stop_token_ids)
        seq = Sequence(prompt=prompt, params=params, stop_ids=stops, sink=sink)
        seq.audio_runs = audio_runs(prompt.ids, self.model.config.audio_token_index, prompt.windows, prompt.keys)
        if request_id is not None:
            seq.request_id = request_id
        if arrival is not None:
            seq.arrival = arrival
        seq.outputs = outputs
        self.scheduler.add(seq)
        self._wake.set()
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        self._wake.set()

    def start(self) -> "LLMEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="qwen2audio-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def stats(self) -> dict:
        return {
            "running": len(self.scheduler.running), "waiting": self.scheduler.queue_depth,
            "slots": self.num_slots, "free_slots": self.scheduler.free_slots, "max_model_len": self.max_len,
            **self.blocks.stats(), **self.runner.stats(), **self.counters,
        }

    # ---- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.scheduler.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # a bug or out-of-memory must not kill the server: fail the batch
                log.exception("engine step failed")
                for seq in list(self.scheduler.running):
                    self._finish(seq, "error", error=f"internal engine error: {e}")

    @torch.inference_mode()
    def step(self) -> None:
        """schedule -> run -> postprocess, once. Public so tests (and callers without the thread) drive it."""
        self.counters["steps"] += 1
        for seq in self.scheduler.take_cancelled_waiting():
            self._finish(seq, "cancelled")
        for seq in [s for s in self.scheduler.running if s.cancelled]:
            self._finish(seq, "cancelled")
        plan = self.scheduler.schedule()
        self.counters["preemptions"] += len(plan.preempted)
        if plan.prefill:
            self._prefill(plan.prefill)
        decode = [s for s in plan.decode if s.status == RUNNING]
        if decode:
            self._decode(decode)

    def _prefill(self, chunks: list[Chunk]) -> None:
        """The step's prompt chunks, in one right-padded batch when `batch_prefill` is on; samples the next token of
        each request whose prompt they finish. If the batch fails (e.g. one request's audio runs out of memory),
        each chunk is retried alone, so only the failing request fails."""
        if len(chunks) > 1 and self.batch_prefill:
            try:
                logits = self.runner.prefill(chunks)
            except Exception:
                log.exception("batched prefill of %d chunks failed; prefilling them one at a time", len(chunks))
            else:
                return self._prefilled(chunks, logits)
        for chunk in chunks:
            try:
                logits = self.runner.prefill([chunk])
            except Exception as e:  # e.g. out of memory on a huge prompt: this request fails, not the server
                log.exception("prefill of %s failed", chunk.seq.request_id)
                chunk.seq.exception = e
                self._finish(chunk.seq, "error", error=f"prefill failed: {e}")
                continue
            self._prefilled([chunk], logits)

    def _prefilled(self, chunks: list[Chunk], logits: torch.Tensor) -> None:
        done, rows = [], []
        for i, chunk in enumerate(chunks):
            seq = chunk.seq
            self.counters["prefill_chunks"] += 1
            self.scheduler.computed(seq, chunk.stop)
            if not chunk.last:
                continue
            seq.prefilled, seq.audio_embeds = True, None
            if seq.answer is None:  # its first prefill (not a recompute after a preemption)
                seq.answer = Detokenizer(self.tokenizer, seq.params.stop)
                self.counters["prefills"] += 1
                self.counters["prompt_tokens"] += seq.prompt_len
                self.counters["prompt_tokens_cached"] += seq.cached_tokens
            self.sampler.add(seq.row, seq.params, seq.token_ids, generator=seq.generator)
            seq.generator = self.sampler.generators[seq.row]
            done.append(seq)
            rows.append(i)
        if done:
            self._postprocess(done, self._sample(logits[rows] if len(rows) < len(chunks) else logits, done))

    def _decode(self, seqs: list[Sequence]) -> None:
        logits = self.runner.decode(seqs)
        self.counters["decode_steps"] += 1
        self.counters["peak_running"] = max(self.counters["peak_running"], len(seqs))
        for s in seqs:
            self.scheduler.computed(s, s.num_computed + 1)
        self._postprocess(seqs, self._sample(logits, seqs))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | str]:
        """logits (B, V) float32 of consecutive rows -> one token per row, each with its request's parameters (an
        error message instead of a token for a row whose sampling failed), with one host sync. Rows that asked for
        log-probabilities get them in `seq.step_logprobs`, from the model's own distribution (before penalty and
        sampling)."""
        tokens, ok = self.sampler.sample(logits, [s.row for s in seqs])
        host, *host_ok = torch.stack([tokens] + ([] if ok is None else [ok.long()])).tolist()
        if host_ok:
            host = [t if good else "sampling failed: the probabilities are not finite (inf or NaN logits)"
                    for t, good in zip(host, host_ok[0])]
        wanted = [i for i, s in enumerate(seqs) if s.params.logprobs is not None and isinstance(host[i], int)]
        if wanted:
            rows = token_logprobs(logits, wanted, [seqs[i].params.logprobs for i in wanted], host)
            for i, lp in zip(wanted, rows):
                seqs[i].step_logprobs = lp
        return host

    def _postprocess(self, seqs: list[Sequence], tokens: list[int]) -> None:
        now = time.perf_counter()
        for seq, tok in zip(seqs, tokens):
            if isinstance(tok, str):  # the row's sampling failed; the message says why
                self._finish(seq, "error", error=tok)
                continue
            seq.num_sampled += 1
            self.counters["generated_tokens"] += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            if tok in seq.stop_ids:
                self._finish(seq, "stop")
                continue
            seq.output_ids.append(tok)
            seq.token_ids.append(tok)
            seq.last_token = tok
            piece = seq.answer.push(tok)
            lps = None if seq.params.logprobs is None else [seq.step_logprobs]
            if seq.answer.stopped:
                self._finish(seq, "stop", piece, [tok], logprobs=lps)
            elif len(seq.output_ids) >= seq.params.max_new_tokens or seq.pos >= self.max_len:
                self._finish(seq, "length", piece, [tok], logprobs=lps)
            else:
                self._emit(seq, Output(seq.request_id, piece, [tok], prompt_tokens=seq.prompt_len,
                                       completion_tokens=seq.num_sampled, logprobs=lps))

    def _finish(self, seq: Sequence, reason: str, piece: str = "", token_ids: list[int] | None = None,
                error: str | None = None, logprobs: list | None = None) -> None:
        if seq.status == FINISHED:
            return
        if reason in ("stop", "length") and seq.answer is not None:
            piece += seq.answer.flush()
        self.scheduler.release(seq)  # its blocks stay cached for a later prompt that starts alike
        seq.status, seq.finish_reason, seq.error = FINISHED, reason, error
        seq.finish_time = time.perf_counter()
        self.counters[f"finished_{reason}"] += 1
        self._emit(seq, Output(seq.request_id, piece, token_ids or [], finished=True, finish_reason=reason,
                               prompt_tokens=seq.prompt_len, completion_tokens=seq.num_sampled, error=error,
                               logprobs=logprobs))

    @staticmethod
    def _emit(seq: Sequence, out: Output) -> None:
        try:
            seq.sink(out)
        except Exception:  # a consumer's bug must not stop the other requests
            log.exception("output sink of %s failed", seq.request_id)


def iter_outputs(seq: Sequence, timeout: float | None = None) -> Iterator[Output]:
    """Outputs of a request submitted without a sink, until it finishes."""
    while True:
        out = seq.outputs.get(timeout=timeout)
        yield out
        if out.finished:
            return


def collect(outputs) -> tuple[str, Output]:
    """The whole text and the final Output of an iterable of Outputs."""
    text, last = [], None
    for out in outputs:
        text.append(out.text)
        last = out
    return "".join(text), last
