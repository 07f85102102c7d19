"""The Python API: ``pipe = qwen2audio.load(path)``; ``pipe.chat(messages)``, ``chat_batch``, ``stream``."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Iterator

import torch

from .chat import asr_prompt, raw_prompt
from .engine import SamplingParams
from .engine.generate import check_positions, raise_if_failed, step_until
from .engine.inputs import PromptInputs, prepare_chat, prepare_prompt
from .engine.kv_cache import BLOCK_SIZE
from .engine.llm_engine import LLMEngine, iter_outputs
from .engine.model_runner import kv_bytes_per_token
from .errors import Qwen2AudioError
from .tokenizer import AUDIO
from .model import Qwen2AudioModel
from .processor import Qwen2AudioProcessor
from .weights import CheckpointError, check_directory

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype, device: str) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise Qwen2AudioError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(sorted(set(DTYPES)))}")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class DeviceError(Qwen2AudioError):
    """A --device the machine cannot provide."""


def check_device(option: str) -> torch.device:
    """Parse `auto`, `cpu`, `cuda` or `cuda:N` and check this machine has it (auto: cuda when available)."""
    if option == "auto":
        option = default_device()
    try:
        device = torch.device(option)
    except (RuntimeError, ValueError):
        raise DeviceError(f"invalid device {option!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {option}: CUDA is not available on this machine")
        if (device.index or 0) >= torch.cuda.device_count():
            raise DeviceError(f"device {option}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {option!r}; use auto, cpu, cuda or cuda:N")
    return device


def stop_ids_from(directory: Path, processor: Qwen2AudioProcessor) -> set[int]:
    """End-of-turn ids: generation_config.json's eos ids, plus <|im_end|> and <|endoftext|>."""
    tok = processor.tokenizer
    ids = {tok.im_end_id, tok.endoftext_id}
    gen = directory / "generation_config.json"
    if gen.exists():
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(f"{gen}: not a valid generation config ({e})") from None
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return ids


# The KV cache a Pipeline's engine keeps between calls (for the prefix cache) when its requests need less; one call
# that needs more gets a bigger engine.
PIPELINE_KV_BYTES = 2 * 2**30
PIPELINE_MAX_BATCH = 32  # requests of one chat_batch run together; more run in waves
PIPELINE_MIN_TOKENS = 8192  # the smallest KV cache a Pipeline makes (within PIPELINE_KV_BYTES): calls vary in size


class Pipeline:
    """The Python API over the engine (engine/llm_engine.py), stepped in the caller's thread: every call submits
    its requests and steps the engine until they are done, so the API, the CLI, the evaluator and the server share
    one generation path (batching, paged KV cache, prefix caching, sampling, stop handling). Calls from several
    threads share the engine: whoever waits steps it (one step at a time), advancing every caller's requests."""

    def __init__(self, model: Qwen2AudioModel, processor: Qwen2AudioProcessor, stop_ids: set[int],
                 truncate: bool = False):
        self.model = model
        self.processor = processor
        self.stop_ids = stop_ids
        self.truncate = truncate  # True mimics the reference's cut at 30 s
        self._engine: LLMEngine | None = None
        self._weights = None  # what the engine's caches were computed with
        self._lock = threading.Lock()  # one engine step at a time; guards the engine's replacement

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def params(self, sampling: SamplingParams | None = None, **kwargs) -> SamplingParams:
        if sampling is not None and kwargs:
            raise Qwen2AudioError("pass either a SamplingParams or keyword sampling options, not both")
        return sampling or SamplingParams(**kwargs)

    # ---- entry points ------------------------------------------------------------------------
    def chat(self, messages: list[dict], sampling: SamplingParams | None = None, **kwargs) -> str:
        return self.chat_batch([messages], sampling, **kwargs)[0]

    def chat_batch(self, conversations: list[list[dict]], sampling: SamplingParams | None = None, **kwargs) -> list[str]:
        prompts = [prepare_chat(self.tokenizer, m, truncate=self.truncate) for m in conversations]
        return self._run(prompts, self.params(sampling, **kwargs))

    def stream(self, messages: list[dict], sampling: SamplingParams | None = None, **kwargs) -> Iterator[str]:
        prompt = prepare_chat(self.tokenizer, messages, truncate=self.truncate)
        yield from self._stream(prompt, self.params(sampling, **kwargs))

    def complete(self, prompts: list[str], audio: list | None = None, sampling: SamplingParams | None = None,
                 **kwargs) -> list[str]:
        """Raw (base-model) prompts such as `<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:`;
        `audio` holds one clip per <|AUDIO|>, across the prompts in order."""
        clips, inputs = list(audio or []), []
        total = sum(p.count(AUDIO) for p in prompts)
        if total != len(clips):
            # the processor's message for the same mismatch (AudioTokenMismatch)
            self.processor(prompts, audio=clips or None, truncate=self.truncate)
        for p in prompts:
            n = p.count(AUDIO)
            inputs.append(prepare_prompt(self.tokenizer, p, clips[:n], truncate=self.truncate))
            clips = clips[n:]
        return self._run(inputs, self.params(sampling, **kwargs))

    def transcribe(self, audio, language: str | None = None, chat: bool = False, **kwargs) -> str:
        """ASR with the paper's prompt; language tags like `<|en|>` are removed from the answer."""
        if chat:
            messages = [{"role": "user", "content": [{"type": "audio", "audio": audio},
                                                      {"type": "text", "text": "Transcribe the speech."}]}]
            text = self.chat(messages, **kwargs)
        else:
            text = self.complete([raw_prompt(asr_prompt(language))], [audio], **kwargs)[0]
        return strip_tags(text)

    # ---- running -----------------------------------------------------------------------------
    def engine(self, prompts: list[PromptInputs] = (), params: SamplingParams | None = None) -> LLMEngine:
        """The engine, made on first use, and made again (its caches dropped) when the model's weights changed since
        (its prefix and audio caches hold what the old weights computed) or when its KV cache is smaller than this
        call needs and may grow: sized to the demand, up to PIPELINE_KV_BYTES, and always to the longest request."""
        weights = _fingerprint(self.model)
        extra = params.max_new_tokens if params else 0
        limit = self.model.config.text_config.max_position_embeddings
        longest = -(-min(max((len(p.ids) for p in prompts), default=0) + extra, limit) // BLOCK_SIZE)
        cap = PIPELINE_KV_BYTES // (kv_bytes_per_token(self.model) * BLOCK_SIZE)
        wanted = sum(-(-(len(p.ids) + extra) // BLOCK_SIZE) for p in prompts)
        demand = max(longest, min(cap, max(wanted, PIPELINE_MIN_TOKENS // BLOCK_SIZE)), 1)
        engine = self._engine
        if engine is None or weights != self._weights or len(engine.blocks.blocks) < demand:
            blocks = max(demand, len(engine.blocks.blocks) if engine is not None and weights == self._weights else 0)
            self._engine = engine = LLMEngine(self.model, self.tokenizer, self.stop_ids, max_batch=PIPELINE_MAX_BATCH,
                                              max_model_len=min(limit, blocks * BLOCK_SIZE), num_blocks=blocks,
                                              max_queue=2**31)
            self._weights = weights
        return engine

    def _submit(self, prompts: list[PromptInputs], params: SamplingParams):
        check_positions(self.model, [len(p.ids) for p in prompts], params.max_new_tokens)
        with self._lock:
            engine = self.engine(prompts, params)
            return engine, [engine.submit(p, params) for p in prompts]

    def _run(self, prompts: list[PromptInputs], params: SamplingParams) -> list[str]:
        if not prompts:
            return []
        engine, seqs = self._submit(prompts, params)
        try:
            step_until(engine, lambda: all(s.finish_reason is not None for s in seqs), self._lock)
        finally:
            for s in seqs:
                engine.cancel(s)  # no-op for finished ones; frees the rest when a step is interrupted
        answers = []
        for s in seqs:
            text = []
            for out in iter_outputs(s, timeout=0):
                text.append(out.text)
            raise_if_failed(s)
            answers.append("".join(text))
        return answers

    def _stream(self, prompt: PromptInputs, params: SamplingParams) -> Iterator[str]:
        engine, (seq,) = self._submit([prompt], params)
        try:
            while True:
                step_until(engine, lambda: not seq.outputs.empty(), self._lock)
                out = seq.outputs.get()
                if out.finished:
                    raise_if_failed(seq)
                if out.text:
                    yield out.text
                if out.finished:
                    return
        finally:
            engine.cancel(seq)  # a stream abandoned midway: the next step frees its blocks


def _fingerprint(model) -> tuple:
    """Changes when a weight is replaced or modified in place (an optimiser step, load_state_dict)."""
    out = []
    for t in list(model.parameters()) + list(model.buffers()):
        try:
            out.append((t.data_ptr(), t._version))
        except RuntimeError:  # an inference tensor keeps no version counter: it cannot be modified in place
            out.append((t.data_ptr(), -1))
    return tuple(out)


def strip_tags(text: str) -> str:
    """Remove `<|...|>` tags such as the ASR language tag."""
    return re.sub(r"<\|[^|>]*\|>", "", text).strip()


def load(path: str | Path | None = None, device: str | None = None, dtype=None, progress: bool = True,
         truncate: bool = False, quantize: str | None = None) -> Pipeline:
    """Load a checkpoint directory for inference; `path=None` is the default model (Whisper base encoder +
    Qwen2.5-Coder-0.5B-Instruct, assembled from its pinned part packages on first use: bundle/assemble.py).

    `quantize="int8" | "int4"` replaces the LLM's linear layers by weight-only quantised ones after
    loading (qwen2audio.quant); the checkpoint on disk stays full precision."""
    if path is None:
        from .bundle.assemble import default_model

        path = default_model(quiet=not progress)
    directory = check_directory(path)
    device = device or default_device()
    model = Qwen2AudioModel.from_pretrained(directory, device=device, dtype=resolve_dtype(dtype, device),
                                            progress=progress)
    if quantize is not None:
        from .quant import quantize_model

        quantize_model(model, quantize)
    processor = Qwen2AudioProcessor.from_pretrained(directory)
    if processor.tokenizer.audio_id != model.config.audio_token_index:
        raise CheckpointError(
            f"{directory}: the tokenizer's <|AUDIO|> id is {processor.tokenizer.audio_id} but config.json says "
            f"audio_token_index={model.config.audio_token_index}"
        )
    if processor.n_mels != model.config.audio_config.num_mel_bins:
        raise CheckpointError(
            f"{directory}: preprocessor feature_size={processor.n_mels} but the encoder expects "
            f"{model.config.audio_config.num_mel_bins} mel bins"
        )
    return Pipeline(model, processor, stop_ids_from(directory, processor), truncate=truncate)


__all__ = ["Pipeline", "load", "strip_tags"]
