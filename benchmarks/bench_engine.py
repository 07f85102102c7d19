"""The continuous-batching engine on CPU, stepped by hand: 16 requests of mixed lengths and sampling options.

Runs the bundled model (real weights, 4k vocabulary) in this process, with no server around it, so the number is
the engine's own: wall time and this process's CPU time from the first submit to the last finished request,
generated tokens / wall second. Half the requests are greedy, half sampled (temperature, top-p, top-k, some with a
seed or a repetition penalty), so per-row sampling is exercised. To compare two versions of the code, run the
script under each (PYTHONPATH=OTHER_CHECKOUT), alternating, on the same machine.

    python benchmarks/bench_engine.py                  # 16 requests, 48 new tokens each, best of 3
    python benchmarks/bench_engine.py --tokens 32 --repeats 5 --threads 1
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


def run(pipe, reqs) -> tuple[float, float, int]:
    from qwen2audio.engine.inputs import prepare_chat
    from qwen2audio.engine.llm_engine import LLMEngine

    engine = LLMEngine(pipe.model, pipe.tokenizer, pipe.stop_ids, max_batch=16)
    prompts = [prepare_chat(pipe.tokenizer, m) for m, _ in reqs]
    t0, c0 = time.perf_counter(), time.process_time()
    seqs = [engine.submit(p, params, ignore_eos=True) for p, (_, params) in zip(prompts, reqs)]
    while engine.scheduler.has_work():
        engine.step()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, sum(s.num_sampled for s in seqs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import qwen2audio

    pipe = qwen2audio.load(None, device="cpu", progress=False)
    reqs = requests(args.requests, args.tokens)
    run(pipe, reqs[:2])  # warm-up
    best = min((run(pipe, reqs) for _ in range(args.repeats)), key=lambda r: r[0])
    wall, cpu, n = best
    print(f"{qwen2audio.__file__}\n{args.requests} requests x {args.tokens} tokens: {n} tokens in {wall:.2f} s wall "
          f"({n / wall:.0f} tok/s), {cpu:.2f} s CPU ({cpu / n * 1e3:.2f} ms CPU per token), best of {args.repeats}")


if __name__ == "__main__":
    main()
