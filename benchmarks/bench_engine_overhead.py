"""Where a batch-1 decode step's time goes: the engine against the bare model over a contiguous K/V cache.

Three paths over the same loaded model, one after another, in rounds (median time per token of each):

- the engine as every surface runs it (`generate_steps`: scheduler, paged cache, batched sampler, detokeniser);
- `ModelRunner.decode` alone, timed inside that engine (the paged cache's gather included, the rest not);
- the model's own forward over a plain contiguous K/V cache with a greedy argmax: no engine at all.

    python benchmarks/bench_engine_overhead.py                   # the default model, 2 threads
    python benchmarks/bench_engine_overhead.py --model DIR --threads 1 --new-tokens 64 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qwen2audio  # noqa: E402
from qwen2audio.engine import LLMEngine, PromptInputs, SamplingParams, generate_steps  # noqa: E402
from qwen2audio.engine.kv_cache import BLOCK_SIZE  # noqa: E402

MAX_LEN = 512


class ContiguousCache:
    """Keys and values of one row in (layers, 1, kv_heads, MAX_LEN, head_dim) tensors: the model's cache interface."""

    def __init__(self, cfg):
        shape = (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, MAX_LEN, cfg.head_dim)
        self.k, self.v, self.pos = torch.zeros(shape), torch.zeros(shape), 0

    def update(self, layer, k, v):
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def engine_of(pipe) -> LLMEngine:
    return LLMEngine(pipe.model, pipe.tokenizer, pipe.stop_ids, max_batch=1, max_model_len=MAX_LEN,
                     num_blocks=MAX_LEN // BLOCK_SIZE, prefix_caching=False)


def through_engine(pipe, ids, n) -> list[float]:
    stamps = [time.perf_counter() for _ in generate_steps(engine_of(pipe), [PromptInputs(ids=list(ids))],
                                                          SamplingParams(max_new_tokens=n), ignore_eos=True)]
    return [b - a for a, b in zip(stamps, stamps[1:])]


def runner_decode(pipe, ids, n) -> list[float]:
    engine, times = engine_of(pipe), []
    decode = engine.runner.decode

    def timed(seqs):
        start = time.perf_counter()
        out = decode(seqs)
        times.append(time.perf_counter() - start)
        return out
    engine.runner.decode = timed
    for _ in generate_steps(engine, [PromptInputs(ids=list(ids))], SamplingParams(max_new_tokens=n), ignore_eos=True):
        pass
    return times


@torch.inference_mode()
def contiguous(pipe, ids, n) -> list[float]:
    lm = pipe.model.language_model
    cache = ContiguousCache(pipe.model.config.text_config)
    hidden = lm.model(lm.model.embed_tokens(torch.tensor([ids])), torch.arange(len(ids))[None], "causal", cache)
    cache.pos = len(ids)
    token, times = lm.lm_head(hidden[:, -1]).argmax(-1), []
    for _ in range(n - 1):
        start = time.perf_counter()
        hidden = lm.model(lm.model.embed_tokens(token[:, None]), torch.tensor([[cache.pos]]), None, cache)
        cache.pos += 1
        token = lm.lm_head(hidden[:, -1]).float().argmax(-1)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = qwen2audio.load(args.model, device="cpu", dtype="float32", progress=False)
    ids = (pipe.tokenizer.encode("The quick brown fox jumps over the lazy dog. ") * args.prompt_tokens)[:args.prompt_tokens]
    paths = [("engine (generate_steps)", through_engine), ("ModelRunner.decode alone", runner_decode),
             ("contiguous cache, no engine", contiguous)]
    results = {name: [] for name, _ in paths}
    for r in range(args.rounds):
        for name, run in paths:
            ms = 1e3 * statistics.median(run(pipe, ids, args.new_tokens))
            results[name].append(ms)
            print(f"round {r + 1}: {name:28s} {ms:7.2f} ms/token", flush=True)
    print(f"\nbatch 1, {args.new_tokens} tokens after {len(ids)}, {args.threads} thread(s); median per token, per round")
    for name, ms in results.items():
        print(f"{name:28s} {' '.join(f'{m:7.2f}' for m in ms)} ms  ->  {1e3 / statistics.median(ms):5.2f} tok/s")


if __name__ == "__main__":
    main()
