"""Continuous-batching engine: requests join and leave the running batch at every step.

One background thread owns the model and runs `step()` = schedule -> run -> postprocess:

- schedule: drop cancelled requests (freeing their KV rows), admit waiting ones into free rows and
  prefill them into their rows (their audio encodings come from the encoded-audio cache when the
  same window was seen before): on a GPU the requests admitted together in one right-padded batch, on a
  CPU each alone (there the batch only delays the first ones' first tokens);
- run: one batched decode step over every running row, each at its own position (`RowKVCache`),
  each attending over its own keys only;
- postprocess: sample every row with its own parameters, stream text to its consumer, and free the
  rows of finished requests at once.

A request's greedy answer equals the one it gets alone (`Pipeline.chat`): its prefill attends only to
its own tokens and a decode row never sees another row's keys.
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
from ..features import log_mel_spectrogram
from ..model.qwen2_audio import Qwen2AudioModel
from ..tokenizer import Tokenizer
from .audio_cache import AudioEmbeddingCache
from .cuda_graphs import DecodeGraphs, enabled
from .detokenize import Detokenizer
from .inputs import PromptInputs
from .sampling import SamplingParams, apply_repetition_penalty, choose_tokens
from .scheduler import FINISHED, Output, Scheduler, Sequence

log = logging.getLogger("qwen2audio.engine")


def kv_bytes_per_token(model: Qwen2AudioModel) -> int:
    t = model.config.text_config
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * model.dtype.itemsize


class LLMEngine:
    def __init__(self, model: Qwen2AudioModel, tokenizer: Tokenizer, stop_ids: set[int], *, max_batch: int = 16,
                 max_model_len: int | None = None, kv_cache_bytes: int | None = None, max_queue: int = 256,
                 prefill_token_budget: int = 4096, audio_cache_bytes: int = 256 * 2**20, n_mels: int | None = None,
                 batch_prefill: bool | None = None):
        self.model = model.eval()
        # None: batch the prefills on CUDA, where 16 batch-1 prefills in a row made the 7B's first tokens 3.6x later
        # than a transformers static batch's (benchmarks/README.md); on a CPU a batch saves no work.
        self.batch_prefill = model.device.type == "cuda" if batch_prefill is None else batch_prefill
        self.tokenizer = tokenizer
        self.stop_ids = frozenset(stop_ids)
        self.n_mels = n_mels or model.config.audio_config.num_mel_bins
        limit = model.config.text_config.max_position_embeddings
        self.max_len = min(max_model_len or min(limit, 4096), limit)
        per_slot = kv_bytes_per_token(model) * self.max_len
        slots = max_batch
        if kv_cache_bytes is not None:
            slots = min(slots, int(kv_cache_bytes // per_slot))
            if slots < 1:
                raise Qwen2AudioError(f"a KV-cache budget of {kv_cache_bytes / 2**30:.2f} GiB holds no request of "
                                 f"{self.max_len} tokens ({per_slot / 2**30:.2f} GiB each): raise the budget or "
                                 f"lower the maximum model length")
        if slots < 1:
            raise Qwen2AudioError("max_batch must be >= 1")
        self.cache = model.new_cache(slots, self.max_len)  # (layers, slots, kv_heads, max_len, head_dim)
        self.kv_cache_bytes = 2 * self.cache.k.numel() * self.cache.k.element_size()
        self.graphs = DecodeGraphs(model, self.cache) if enabled(model) else None  # CUDA: decode steps as graphs
        self.scheduler = Scheduler(slots, self.max_len, max_queue, prefill_token_budget)
        self.audio_cache = AudioEmbeddingCache(audio_cache_bytes)
        # Every key exists from the start, so that stats() readers on other threads never see the dict grow.
        self.counters: Counter = Counter(dict.fromkeys(
            ["steps", "prefills", "decode_steps", "prompt_tokens", "generated_tokens", "peak_running",
             "audio_windows_encoded", "finished_stop", "finished_length", "finished_cancelled", "finished_error"], 0))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- public API (any thread) ------------------------------------------------------------
    @property
    def num_slots(self) -> int:
        return self.scheduler.num_slots

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
            "audio_cache_hits": self.audio_cache.hits, "audio_cache_misses": self.audio_cache.misses,
            "audio_cache_entries": len(self.audio_cache), "audio_cache_bytes": self.audio_cache.bytes,
            **self.counters,
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
        """schedule -> run -> postprocess, once. Public so tests can drive the engine by hand."""
        self.counters["steps"] += 1
        for seq in self.scheduler.take_cancelled_waiting():
            self._finish(seq, "cancelled")
        for seq in [s for s in self.scheduler.running if s.cancelled]:
            self._finish(seq, "cancelled")
        admitted = self.scheduler.admit()
        if admitted:
            self._prefill(admitted)
        if self.scheduler.running:
            self._decode()

    def _prefill(self, seqs: list[Sequence]) -> None:
        """The requests admitted together, each written into its own cache row (the rows are consecutive), in
        one right-padded batch when `batch_prefill` is on; samples their first tokens. If the batch fails (e.g.
        one request's audio runs out of memory), each request is retried alone, so only the failing one fails."""
        if len(seqs) > 1 and self.batch_prefill:
            try:
                logits = self._prefill_logits(seqs)
            except Exception:
                log.exception("batched prefill of %d requests failed; prefilling them one at a time", len(seqs))
            else:
                return self._first_tokens(seqs, logits)
        for seq in seqs:
            try:
                logits = self._prefill_logits([seq])
            except Exception as e:  # e.g. out of memory on a huge prompt: this request fails, not the server
                log.exception("prefill of %s failed", seq.request_id)
                self._finish(seq, "error", error=f"prefill failed: {e}")
                continue
            self._first_tokens([seq], logits)

    def _prefill_logits(self, seqs: list[Sequence]) -> torch.Tensor:
        model, device = self.model, self.model.device
        lengths = [s.prompt_len for s in seqs]
        ids = torch.full((len(seqs), max(lengths)), self.tokenizer.pad_id, dtype=torch.long)
        audio = []
        for i, s in enumerate(seqs):
            ids[i, : lengths[i]] = torch.tensor(s.prompt.ids)
            audio += self._encode(s.prompt) or []
        ids = ids.to(device)
        ends = torch.tensor(lengths, device=device)
        key_mask = torch.arange(ids.shape[1], device=device)[None, :] < ends[:, None]
        embeds = model.embed(ids, audio or None)
        rows = self.cache.rows(seqs[0].row, seqs[0].row + len(seqs))
        return model.decode(embeds, key_mask, rows, offset=0, at=ends - 1)[:, -1].float()

    def _first_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        for seq in seqs:
            self._init_sampling(seq)
            self.counters["prefills"] += 1
            self.counters["prompt_tokens"] += seq.prompt_len
            seq.pos = seq.prompt_len
        self._postprocess(seqs, self._sample(logits, seqs))

    def _decode(self) -> None:
        """One token for every running row; row i writes at position pos_i and reads keys 0..pos_i."""
        seqs = list(self.scheduler.running)
        device = self.model.device
        positions = [s.pos for s in seqs]
        pos = torch.tensor(positions, device=device)
        span = max(positions) + 1
        tokens = torch.tensor([s.last_token for s in seqs], device=device)
        if self.graphs is not None:
            logits = self.graphs(tokens, pos, pos, torch.arange(span, device=device)[None, :] <= pos[:, None])
        else:
            mask = None  # rows at one common position see exactly their own keys: no mask needed
            if min(positions) != span - 1:
                beyond = torch.arange(span, device=device)[None, :] > pos[:, None]  # (B, span)
                mask = torch.zeros(beyond.shape, dtype=self.model.dtype, device=device).masked_fill_(beyond, float("-inf"))
                mask = mask[:, None, None, :]  # (B, 1, 1, span)
            logits = self.model.decode_rows(tokens, pos, mask, self.cache, span).float()  # (B, V)
        self.counters["decode_steps"] += 1
        self.counters["peak_running"] = max(self.counters["peak_running"], len(seqs))
        for s in seqs:
            s.pos += 1
        self._postprocess(seqs, self._sample(logits, seqs))

    # ---- per-row sampling and bookkeeping ---------------------------------------------------
    def _init_sampling(self, seq: Sequence) -> None:
        p = seq.params
        seq.answer = Detokenizer(self.tokenizer, p.stop)
        if p.seed is not None and not p.greedy:
            seq.generator = torch.Generator(device=self.model.device).manual_seed(p.seed)
        if p.repetition_penalty != 1.0:
            vocab = self.model.config.text_config.vocab_size
            seq.seen = torch.zeros(vocab, dtype=torch.bool, device=self.model.device)
            seq.seen[torch.tensor(seq.prompt.ids, device=self.model.device)] = True

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int | str]:
        """logits (B, V) float32 -> one token per row, each with its request's parameters (an error
        message instead of a token for a row whose sampling failed). Rows that asked for log-probabilities
        get them in `seq.step_logprobs`, from the model's own distribution (before penalty and sampling)."""
        wanted = {i: logits[i].log_softmax(-1) for i, s in enumerate(seqs) if s.params.logprobs is not None}
        for i, s in enumerate(seqs):
            if s.seen is not None:
                logits[i] = apply_repetition_penalty(logits[i], s.seen, s.params.repetition_penalty)
        tokens = logits.argmax(-1)
        failed = {}
        for i, s in enumerate(seqs):
            if not s.params.greedy:
                try:
                    tokens[i] = choose_tokens(logits[i : i + 1], s.params, s.generator)[0]
                except RuntimeError as e:  # e.g. NaN probabilities: only this row fails
                    failed[i] = f"sampling failed: {e}"
        host = tokens.tolist()  # the one host sync of the step (and one more per row that wants logprobs)
        for i, (s, t) in enumerate(zip(seqs, host)):
            if i in failed:
                host[i] = failed[i]
                continue
            if s.seen is not None:
                s.seen[t] = True
            if i in wanted:
                lp = wanted[i]
                top = lp.topk(s.params.logprobs) if s.params.logprobs else None
                s.step_logprobs = (t, float(lp[t]), list(zip(top.indices.tolist(), top.values.tolist())) if top else [])
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
        if seq.row is not None:
            moved = self.scheduler.release(seq)
            if moved is not None:  # keep running rows contiguous: the last row takes the freed one
                src, dst = moved
                n = self.scheduler.running[dst].pos
                self.cache.k[:, dst, :, :n] = self.cache.k[:, src, :, :n]
                self.cache.v[:, dst, :, :n] = self.cache.v[:, src, :, :n]
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

    def _encode(self, prompt: PromptInputs) -> list[torch.Tensor] | None:
        """Audio embeddings per window; only windows missing from the cache go through the tower."""
        if not prompt.windows:
            return None
        out = [self.audio_cache.get(key) for key in prompt.keys]
        missing = [i for i, e in enumerate(out) if e is None]
        if missing:
            feats, frame_mask = log_mel_spectrogram([prompt.windows[i] for i in missing], self.n_mels,
                                                    device=self.model.device)
            for i, emb in zip(missing, self.model.encode_audio(feats, frame_mask)):
                out[i] = emb.clone()  # a view would keep the whole padded batch alive in the cache
                self.audio_cache.put(prompt.keys[i], out[i])
            self.counters["audio_windows_encoded"] += len(missing)
        return out


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
