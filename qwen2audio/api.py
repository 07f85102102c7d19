"""The Python API: ``pipe = qwen2audio.load(path)``; ``pipe.chat(messages)``, ``chat_batch``, ``stream``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import torch

from .chat import asr_prompt, raw_prompt
from .engine import SamplingParams, generate_steps
from .engine.detokenize import Detokenizer
from .errors import Qwen2AudioError
from .model import Qwen2AudioModel
from .processor import Qwen2AudioProcessor
from .weights import CheckpointError, check_directory

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def bundled_model_dir() -> Path | None:
    """The small model shipped inside the package, when present."""
    path = Path(__file__).parent / "assets" / "model"
    return path if (path / "config.json").exists() else None


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


class Pipeline:
    def __init__(self, model: Qwen2AudioModel, processor: Qwen2AudioProcessor, stop_ids: set[int],
                 truncate: bool = False):
        self.model = model
        self.processor = processor
        self.stop_ids = stop_ids
        self.truncate = truncate  # True mimics the reference's cut at 30 s

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
        inputs = self.processor.prepare_chats(conversations, truncate=self.truncate)
        return self._run(inputs, self.params(sampling, **kwargs))

    def stream(self, messages: list[dict], sampling: SamplingParams | None = None, **kwargs) -> Iterator[str]:
        inputs = self.processor.prepare_chats([messages], truncate=self.truncate)
        yield from self._stream(inputs, self.params(sampling, **kwargs))

    def complete(self, prompts: list[str], audio: list | None = None, sampling: SamplingParams | None = None,
                 **kwargs) -> list[str]:
        """Raw (base-model) prompts such as `<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:`."""
        inputs = self.processor.prepare_raw(prompts, audio, truncate=self.truncate)
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
    def _run(self, inputs, params: SamplingParams) -> list[str]:
        B = inputs["input_ids"].shape[0]
        decoders = [Detokenizer(self.tokenizer, params.stop) for _ in range(B)]
        for step in generate_steps(self.model, inputs, params, self.stop_ids | set(params.stop_token_ids)):
            for i, tok in enumerate(step.tokens):
                if tok is not None and not decoders[i].stopped:
                    decoders[i].push(tok)
            if all(d.stopped or f for d, f in zip(decoders, step.finished)):
                break
        for d in decoders:
            d.flush()
        return [d.text for d in decoders]

    def _stream(self, inputs, params: SamplingParams) -> Iterator[str]:
        answer = Detokenizer(self.tokenizer, params.stop)
        for step in generate_steps(self.model, inputs, params, self.stop_ids | set(params.stop_token_ids)):
            tok = step.tokens[0]
            if tok is not None:
                piece = answer.push(tok)
                if piece:
                    yield piece
            if answer.stopped or step.finished[0]:
                break
        tail = answer.flush()
        if tail:
            yield tail


def strip_tags(text: str) -> str:
    """Remove `<|...|>` tags such as the ASR language tag."""
    return re.sub(r"<\|[^|>]*\|>", "", text).strip()


def load(path: str | Path | None = None, device: str | None = None, dtype=None, progress: bool = True,
         truncate: bool = False, quantize: str | None = None) -> Pipeline:
    """Load a checkpoint directory (or the bundled model when `path` is None) for inference.

    `quantize="int8" | "int4"` replaces the LLM's linear layers by weight-only quantised ones after
    loading (qwen2audio.quant); the checkpoint on disk stays full precision."""
    if path is None:
        path = bundled_model_dir()
        if path is None:
            raise CheckpointError("no model given and no bundled model is installed; pass a checkpoint directory")
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
