"""The continuous-batching engine on CPU, stepped by hand: 16 requests of mixed lengths and sampling options.

Runs the default model (Whisper base + Qwen2.5-Coder-0.5B, 151,936-token vocabulary) in this process, with no
server around it, so the number is the engine's own: wall time and this process's CPU time from the first submit
to the last finished request, generated tokens / wall second. Half the requests are greedy, half sampled
(temperature, top-p, top-k, some with a seed or a repetition penalty), so per-row sampling is exercised. To compare two versions of the code, run the
script under each (PYTHONPATH=OTHER_CHECKOUT), alternating, on the same machine.

    python benchmarks/bench_engine.py                  # 16 requests, 48 new tokens each, best of 3
    python benchmarks/bench_engine.py --tokens 32 --repeats 5 --threads 1
    python benchmarks/bench_engine.py --sampler      # the sampling step alone, 16 rows x 151,936 logits: the
                                                     # old per-row loop vs the batched Sampler, side by side
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def requests(n: int, tokens: int):
    from qwen2audio.engine import SamplingParams

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        t = np.arange(int((1.0 + 0.5 * (i % 6)) * 16000)) / 16000
        wav = (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
        messages = [{"role": "user", "content": [{"type": "audio", "audio": wav},
                                                 {"type": "text", "text": "Describe the sound."}]}]
        if i % 2 == 0:
            params = SamplingParams(max_new_tokens=tokens)
        else:
            params = SamplingParams(max_new_tokens=tokens, temperature=0.8, top_p=0.9, top_k=50 if i % 4 == 1 else 0,
                                    seed=i if i % 3 else None, repetition_penalty=1.1 if i % 5 == 1 else 1.0)
        out.append((messages, params))
    return out


def run(pipe, reqs) -> tuple[float, float, int, list[float], list[float]]:
    from qwen2audio.engine.inputs import prepare_chat
    from qwen2audio.engine.llm_engine import LLMEngine

    engine = LLMEngine(pipe.model, pipe.tokenizer, pipe.stop_ids, max_batch=16)
    prompts = [prepare_chat(pipe.tokenizer, m) for m, _ in reqs]
    t0, c0 = time.perf_counter(), time.process_time()
    first = {}  # request -> (wall s, this process's CPU s) at its first token: CPU is steadier on a shared machine

    def sink(i):
        return lambda out: first.setdefault(i, (time.perf_counter() - t0, time.process_time() - c0))

    seqs = [engine.submit(p, params, sink=sink(i), ignore_eos=True)
            for i, (p, (_, params)) in enumerate(zip(prompts, reqs))]
    while engine.scheduler.has_work():
        engine.step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return (wall, cpu, sum(s.num_sampled for s in seqs), [first[i][0] for i in range(len(seqs))],
            [first[i][1] for i in range(len(seqs))])


def old_per_row_sample(logits, params, generators, seen):
    """The engine's sampling before issue 21: a Python loop over rows, one full pass (and sort) per sampled row."""
    from qwen2audio.engine.sampling import apply_repetition_penalty

    def choose(logits, p, g):
        logits = logits.float() / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop_sorted = probs.cumsum(-1) - probs >= p.top_p
            logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
        return torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(-1)

    for i, p in enumerate(params):
        if p.repetition_penalty != 1.0:
            logits[i] = apply_repetition_penalty(logits[i], seen[i], p.repetition_penalty)
    tokens = logits.argmax(-1)
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = choose(logits[i: i + 1], p, generators[i])[0]
    return tokens.tolist()


def bench_sampler(repeats: int) -> None:
    from qwen2audio.engine.sampling import Sampler

    V, params = 151936, [p for _, p in requests(16, 8)]
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(16, V, generator=gen) * 4 for _ in range(repeats)]
    sampler = Sampler(16, V, "cpu")
    for row, p in enumerate(params):
        sampler.add(row, p, list(range(row, 400, 7)))
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None and not p.greedy else None for p in params]
    seen = sampler.seen.clone()
    times = {"old": [], "new": []}
    for x in logits:
        t0 = time.perf_counter()
        old = old_per_row_sample(x.clone(), params, gens, seen)
        t1 = time.perf_counter()
        tokens, ok = sampler.sample(x.clone())
        new = tokens.tolist()
        t2 = time.perf_counter()
        times["old"].append(t1 - t0)
        times["new"].append(t2 - t1)
        greedy = [i for i, p in enumerate(params) if p.greedy]
        assert [old[i] for i in greedy] == [new[i] for i in greedy]
    old_ms, new_ms = (1e3 * float(np.median(times[k])) for k in ("old", "new"))
    print(f"sampling 16 rows x {V:,} logits ({sum(not p.greedy for p in params)} sampled): old per-row loop "
          f"{old_ms:.1f} ms, batched Sampler {new_ms:.1f} ms, ratio {old_ms / new_ms:.2f}x (median of {repeats})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sampler", action="store_true", help="time the sampling step alone, old vs new")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.sampler:
        return bench_sampler(max(args.repeats, 5))
    import qwen2audio

    pipe = qwen2audio.load(None, device="cpu", progress=False)
    reqs = requests(args.requests, args.tokens)
    run(pipe, reqs[:2])  # warm-up
    best = min((run(pipe, reqs) for _ in range(args.repeats)), key=lambda r: r[1])
    wall, cpu, n, ttft, cpu_ttft = best
    print(f"{qwen2audio.__file__}\n{args.requests} requests x {args.tokens} tokens: {n} tokens in {wall:.2f} s wall "
          f"({n / wall:.0f} tok/s), {cpu:.2f} s CPU ({cpu / n * 1e3:.2f} ms CPU per token, {n / cpu:.0f} tok per "
          f"CPU-s), TTFT p50 {np.percentile(ttft, 50):.2f} s p95 {np.percentile(ttft, 95):.2f} s wall, "
          f"{np.percentile(cpu_ttft, 50):.2f} / {np.percentile(cpu_ttft, 95):.2f} CPU-s (all submitted at once), "
          f"least CPU of {args.repeats}")


if __name__ == "__main__":
    main()
