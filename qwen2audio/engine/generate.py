"""The static generate loop: prefill once, then one token per step from a preallocated contiguous KV cache.

No surface runs on it any more (the Python API, CLI, evaluator and server all use the engine, llm_engine.py). It
stays as the plain reference the engine is checked against (tests: cached == uncached, the engine's answers ==
this loop's) and as the benchmarks' model-only decode loop: a processor batch in, one step's tokens out.

Batched rows are left-padded; each row's positions start at its first real token, so a row's
greedy answer is the same alone or in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..model.qwen2_audio import Qwen2AudioModel
from .cuda_graphs import decode_graphs_for
from .sampling import Sampler, SamplingParams
from .scheduler import PromptTooLong


@dataclass
class StepOutput:
    tokens: list[int | None]  # the new token of each row, None for rows already finished
    finished: list[bool]


@torch.inference_mode()
def generate_steps(model: Qwen2AudioModel, inputs: dict, params: SamplingParams,
                   stop_ids: set[int]) -> Iterator[StepOutput]:
    """Yield every step's new tokens for a batch made by the processor. Stop ids end a row (not yielded)."""
    device = model.device
    input_ids = inputs["input_ids"].to(device)
    key_mask = inputs.get("attention_mask", torch.ones_like(input_ids)).to(device).bool()
    B, T = input_ids.shape
    max_len = T + params.max_new_tokens
    limit = model.config.text_config.max_position_embeddings
    if int(key_mask.sum(-1).max()) + params.max_new_tokens > limit:
        raise PromptTooLong(
            f"prompt of {int(key_mask.sum(-1).max())} tokens + max_new_tokens={params.max_new_tokens} "
            f"exceeds the model's {limit} positions"
        )

    audio = None
    if inputs.get("input_features") is not None:
        audio = model.encode_audio(inputs["input_features"], inputs["feature_attention_mask"])
    embeds = model.embed(input_ids, audio)

    graphs = decode_graphs_for(model, B, max_len)  # on CUDA: decode steps replayed as graphs
    try:
        yield from _steps(model, input_ids, key_mask, embeds, params, stop_ids, max_len, graphs)
    finally:
        if graphs is not None:
            graphs.lock.release()


def _steps(model, input_ids, key_mask, embeds, params, stop_ids, max_len, graphs):
    device = model.device
    B, T = input_ids.shape
    cache = graphs.cache.rows(0, B) if graphs is not None else model.new_cache(B, max_len)
    full_mask = torch.zeros(B, max_len, dtype=torch.bool, device=device)
    full_mask[:, :T] = key_mask
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    sampler = Sampler(B, model.config.text_config.vocab_size, device)  # the engine's sampler: rows sample alike
    for i in range(B):
        sampler.add(i, params, input_ids[i][key_mask[i]])

    stop = torch.tensor(sorted(stop_ids) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits = model.decode(embeds, full_mask, cache, offset=0, positions=positions, last_only=True)[:, -1]
    next_pos = positions[:, -1:] + 1
    for step in range(params.max_new_tokens):
        tokens, ok = sampler.sample(logits.float())
        is_stop = torch.isin(tokens, stop)
        newly_done = done | is_stop
        rows = [tokens, newly_done.long(), done.long()] + ([] if ok is None else [ok.long()])
        host_tokens, host_done, host_prev, *host_ok = torch.stack(rows).tolist()  # one sync
        if host_ok and not all(host_ok[0]):
            raise RuntimeError("sampling failed: the probabilities are not finite (inf or NaN logits)")
        yield StepOutput(
            tokens=[None if (host_prev[i] or host_done[i]) else t for i, t in enumerate(host_tokens)],
            finished=[bool(d) for d in host_done],
        )
        done = newly_done
        if all(host_done) or step == params.max_new_tokens - 1:
            return
        offset = T + step
        full_mask[:, offset] = ~done  # finished rows stop contributing keys
        if graphs is not None:
            logits = graphs(tokens, next_pos[:, 0], offset, full_mask[:, : offset + 1])
        else:
            step_embeds = model.language_model.model.embed_tokens(tokens[:, None])  # generated ids are plain text
            logits = model.decode(step_embeds, full_mask, cache, offset=offset, positions=next_pos,
                                  last_only=True)[:, -1]
        next_pos = next_pos + 1
