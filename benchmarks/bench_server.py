"""Serving benchmark: 16 concurrent chat requests with audio, our server vs transformers generate().

One random-weight model (bench_core's sizes, built by transformers) is saved to a temporary
directory. Then the same 16 requests (a 2-9.5 s clip + a question each, N new tokens, EOS ignored so
every side generates exactly N tokens per request) are answered three ways:

1. ours: `qwen2audio serve` in a subprocess (continuous batching, --max-batch 16, encoded-audio cache
   off); the 16 requests are sent at once over HTTP, streamed (SSE), by an asyncio client here;
2. transformers `generate()` one request at a time, in arrival order;
3. transformers `generate()` on one static batch of the 16 (left padding).

All requests arrive at t0. Throughput = generated tokens / (last answer's end - t0). Time to first
token (TTFT) per request = its first token's time - t0: for ours the first streamed text, for
transformers the first step's logits (a no-op LogitsProcessor stamps them). p50/p95 over the 16.
Ours and the static batch run `--repeats` times, alternated, and the best run of each is reported
(the machine is shared: load from other processes only ever slows a run down).

    python benchmarks/bench_server.py            # bench_core's "full" model (121M params), N=64
    python benchmarks/bench_server.py --quick    # smaller model, N=32
    python benchmarks/bench_server.py --device cuda --dtype bfloat16 --size 7b   # every side on the GPU
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_core import (SIZES, Background, StepClock, build_reference, chat, clip, on_device,  # noqa: E402
                        save_checkpoint, sync)

from qwen2audio.processor import Qwen2AudioProcessor  # noqa: E402

OURS = "ours: server, continuous batching"
STATIC = "transformers generate(), static batch of 16"
SEQUENTIAL = "transformers generate(), one at a time"
QUESTIONS = ["Describe the sound.", "What's that sound?", "Transcribe the speech.", "Who is speaking?"]
N_REQUESTS = 16


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def wav_b64(wav: np.ndarray) -> str:
    buf = io.BytesIO()
    sf.write(buf, wav, 16000, format="WAV", subtype="FLOAT")  # lossless: every side decodes the same samples
    return base64.b64encode(buf.getvalue()).decode()


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def bg_seconds(bg: Background) -> float:
    return max(1e-9, time.perf_counter() - bg.start[2]) if bg.start else 1e-9


# ---- ours: the real server in a subprocess, driven over HTTP -----------------------------------
def start_server(directory: Path, threads: int | None, device: str, dtype: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "qwen2audio", "serve", "--model", str(directory), "--port", str(port),
           "--max-batch", str(N_REQUESTS), "--max-model-len", "2048", "--log-level", "warning",
           "--audio-cache-mb", "0",  # no encoded-audio reuse: repeated runs must not get cheaper
           "--device", device, "--dtype", dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
        try:
            httpx.get(f"{url}/health", timeout=1).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start")


async def one_request(client, url: str, body: dict, t0: float) -> tuple[float, float, int, str]:
    first, text, tokens = None, [], 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            if msg.get("usage"):
                tokens = msg["usage"]["completion_tokens"]
            for choice in msg.get("choices", []):
                if choice["delta"].get("content") is not None and first is None and choice["delta"]["content"]:
                    first = time.perf_counter() - t0
                text.append(choice["delta"].get("content") or "")
    return first, time.perf_counter() - t0, tokens, "".join(text)


async def run_ours(url: str, bodies: list[dict]):
    import httpx

    limits = httpx.Limits(max_connections=len(bodies) + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, {**bodies[0], "max_tokens": 4}, time.perf_counter())  # warm-up
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, b, t0) for b in bodies))
    return results


# ---- transformers -------------------------------------------------------------------------------


def hf_generate(ref, inputs, n: int, pad_id: int):
    from transformers import GenerationConfig, LogitsProcessorList

    clock = StepClock()
    gen = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                           pad_token_id=pad_id, bos_token_id=None, use_cache=True)
    inputs = on_device(inputs, ref.device, ref.dtype)
    with torch.inference_mode():
        out = ref.generate(**inputs, generation_config=gen, logits_processor=LogitsProcessorList([clock]))
    sync()
    return out[:, inputs["input_ids"].shape[1]:], clock.stamps


def run_hf_sequential(ref, processor, convs, n, pad_id):
    t0 = time.perf_counter()
    ttft, ends, tokens = [], [], []
    for c in convs:
        out, stamps = hf_generate(ref, dict(processor.prepare_chats([c])), n, pad_id)
        ttft.append(stamps[0] - t0)
        ends.append(time.perf_counter() - t0)
        tokens.append(out[0].tolist())
    return ttft, ends, tokens


def run_hf_static(ref, processor, convs, n, pad_id):
    t0 = time.perf_counter()
    out, stamps = hf_generate(ref, dict(processor.prepare_chats(convs)), n, pad_id)
    end = time.perf_counter() - t0
    return [stamps[0] - t0] * len(convs), [end] * len(convs), out.tolist()


# ---- main ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller model and fewer tokens (= --size quick)")
    ap.add_argument("--size", choices=sorted(SIZES), default="full", help="bench_core's model shapes (default: full; "
                                                                       "7b needs a GPU)")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per request (default: 64, quick: 32)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on every side (default: torch's)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of ours and of the static batch, alternated; "
                                                          "the best of each is reported (default: 2)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N, for every side (default: cpu)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                    help="weight and compute dtype of every side (default: float32)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else args.size]
    n = args.tokens or (32 if args.quick else 64)
    ref, tok = build_reference(size, torch.device(args.device), getattr(torch, args.dtype))
    with torch.no_grad():
        # The test tokenizer knows ~400 ids; the model's vocabulary is larger so that the lm_head costs what
        # it would with a real one. Rows past the tokenizer give logit 0, below the max of ~400 random
        # logits, so every generated id decodes to text (TTFT is measured at the first streamed text).
        ref.lm_head.weight[tok.vocab_size:] = 0
    tmp = tempfile.TemporaryDirectory(prefix="bench_server_")
    directory = Path(tmp.name)
    save_checkpoint(ref, tok, directory)
    processor = Qwen2AudioProcessor.from_pretrained(directory)
    params = sum(p.numel() for p in ref.parameters())

    wavs = [clip(2.0 + 0.5 * i, seed=40 + i) for i in range(N_REQUESTS)]
    convs = [chat(w, QUESTIONS[i % len(QUESTIONS)]) for i, w in enumerate(wavs)]
    bodies = [{"model": directory.name, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True},
               "messages": [{"role": "user", "content": [
                   {"type": "input_audio", "input_audio": {"data": wav_b64(w), "format": "wav"}},
                   {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]} for i, w in enumerate(wavs)]
    prompt_lens = [processor.prepare_chats([c])["input_ids"].shape[1] for c in convs]
    print(f"torch {torch.__version__}, threads {args.threads or torch.get_num_threads()}; model {params / 1e6:.0f}M "
          f"params (text hidden {size['text']['hidden_size']}, {size['text']['num_hidden_layers']} layers, vocab "
          f"{size['text']['vocab_size']}), {args.dtype} on {args.device}")
    print(f"{N_REQUESTS} requests, clips 2.0-{2.0 + 0.5 * (N_REQUESTS - 1):.1f} s, prompts {min(prompt_lens)}-"
          f"{max(prompt_lens)} tokens, {n} new tokens each (EOS ignored)\n")

    # ours and the static batch alternate over the repeats, so that load from other processes on a shared
    # machine hits both alike; each row reports its best run (all runs are listed)
    runs = {OURS: [], STATIC: []}
    ours_text = None
    proc, url = start_server(directory, args.threads, args.device, args.dtype)
    try:
        for r in range(args.repeats):
            bg, server_cpu0 = Background(), process_cpu(proc.pid)
            results = asyncio.run(run_ours(url, bodies))
            server_cpu = process_cpu(proc.pid) - server_cpu0
            assert all(x[2] == n for x in results), [x[2] for x in results]
            load = bg.share()
            if load is not None:  # the server is another process: its own CPU time is not "other load"
                load = max(0.0, load - server_cpu / (bg_seconds(bg) * (os.cpu_count() or 1)))
            ends = [x[1] for x in results]
            runs[OURS].append((n * N_REQUESTS / max(ends), [x[0] for x in results], max(ends), load))
            ours_text = [x[3] for x in results]
            print(f"run {r + 1}: ours {max(ends):.1f} s", end="", flush=True)
            bg = Background()
            s_ttft, s_ends, _ = run_hf_static(ref, processor, convs, n, tok.pad_id)
            runs[STATIC].append((n * N_REQUESTS / max(s_ends), s_ttft, max(s_ends), bg.share()))
            print(f", transformers static batch {max(s_ends):.1f} s", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    bg = Background()
    t_ttft, t_ends, seq_tokens = run_hf_sequential(ref, processor, convs, n, tok.pad_id)
    runs[SEQUENTIAL] = [(n * N_REQUESTS / max(t_ends), t_ttft, max(t_ends), bg.share())]
    print(f"transformers one at a time {max(t_ends):.1f} s", flush=True)
    same = sum(tok.decode(t) == o for t, o in zip(seq_tokens, ours_text))
    tmp.cleanup()
    rows = {name: max(rs, key=lambda x: x[0]) for name, rs in runs.items()}

    print("\n| system | generated tok/s | TTFT p50 (s) | TTFT p95 (s) | wall (s) | other load |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (rate, tt, wall, load) in rows.items():
        print(f"| {name} | {rate:.1f} | {percentile(tt, 50):.2f} | {percentile(tt, 95):.2f} | {wall:.1f} | "
              f"{'-' if load is None else f'{load:.0%}'} |")
    for name, rs in runs.items():
        print(f"  {name}: tok/s of each run {', '.join(f'{x[0]:.1f}' for x in rs)}")
    best = max(rows[STATIC][0], rows[SEQUENTIAL][0])
    print(f"\nthroughput ratio ours / best transformers = {rows[OURS][0] / best:.2f}x (target >= 2x)")
    print(f"greedy answers: {same}/{N_REQUESTS} of the server's texts equal transformers' one-at-a-time tokens "
          f"(decoded with the checkpoint's tokenizer)")
    print("other load = CPU share used by other processes while a row ran (> 5%: numbers unreliable). The server "
          "row includes HTTP, JSON, base64 audio decoding and the client, all on the same CPUs.")


if __name__ == "__main__":
    main()
