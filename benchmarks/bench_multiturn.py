"""Multi-turn audio chat over HTTP: what the prefix cache saves when a conversation is re-sent every turn.

The OpenAI API is stateless: turn k sends the whole history again (the 30 s clip of turn 1, every question and
answer so far). The server's paged KV cache keeps full blocks of earlier prompts and answers by content hash (the
clip's content included), so turn k computes only what is new since turn k-1's answer.

One `qwen2audio serve` subprocess (the default model unless --model) gets a 4-turn conversation through
/v1/chat/completions with streaming, greedy, each turn's answer appended to the history. Per turn: time to first
token (TTFT, wall) and the server's CPU seconds from the request to its first token (the machine is shared: CPU
time is the steadier measure), and the prompt tokens the prefix cache supplied (from /metrics' engine counters).
Then a second, fresh server (warmed up on an unrelated request) answers turn 4's conversation cold: the same
prompt length, nothing cached. Printed: turn 4 vs cold, wall and CPU ratios (target <= 0.3), and whether the two
answers are identical.

    nice -n 15 env OMP_NUM_THREADS=1 python benchmarks/bench_multiturn.py
    python benchmarks/bench_multiturn.py --model CHECKPOINT_DIR --tokens 48 --repeats 3
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

QUESTIONS = ["What can you hear in this recording?", "Describe it in more detail, please.",
             "Is it loud or quiet?", "Summarise everything you heard in one sentence."]


def clip(seconds: float = 30.0, seed: int = 0) -> np.ndarray:
    """A deterministic 30 s test signal: a gliding tone over noise, with a few bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    wav = 0.2 * np.sin(2 * np.pi * (220 + 30 * t) * t) + 0.02 * rng.standard_normal(t.size)
    wav[(t % 5) < 0.3] *= 3
    return wav.astype(np.float32)


def wav_b64(wav: np.ndarray) -> str:
    buf = io.BytesIO()
    sf.write(buf, wav, 16000, format="WAV", subtype="FLOAT")
    return base64.b64encode(buf.getvalue()).decode()


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, model: str, threads: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "qwen2audio", "serve", "--model", model, "--port", str(port), "--device", "cpu",
               "--max-batch", "4", "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=HERE.parent)
        self.url = f"http://127.0.0.1:{port}"
        import httpx

        self.http = httpx.Client(timeout=600)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()}")
            try:
                self.http.get(f"{self.url}/health", timeout=2).raise_for_status()
                self.model = self.http.get(f"{self.url}/v1/models").json()["data"][0]["id"]
                return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.close()
        raise RuntimeError("server did not start")

    def chat(self, messages: list[dict], tokens: int) -> dict:
        """Stream one greedy answer -> text, TTFT (wall s), server CPU s to the first token and in all."""
        body = {"model": self.model, "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True}
        c0, t0 = process_cpu(self.proc.pid), time.perf_counter()
        first = first_cpu = None
        text = []
        with self.http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:]).get("choices", []):
                    piece = choice["delta"].get("content") or ""
                    if piece and first is None:
                        first, first_cpu = time.perf_counter() - t0, process_cpu(self.proc.pid) - c0
                    text.append(piece)
        return {"text": "".join(text), "ttft": first, "ttft_cpu": first_cpu, "total": time.perf_counter() - t0,
                "cpu": process_cpu(self.proc.pid) - c0}

    def counters(self) -> dict:
        """The engine's prompt-token counters, from /metrics."""
        names = {"qwen2audio_prompt_tokens_total": "prompt_tokens",
                 "qwen2audio_prefix_cache_hit_tokens_total": "prompt_tokens_cached"}
        out = {}
        for line in self.http.get(f"{self.url}/metrics").text.splitlines():
            name, _, value = line.partition(" ")
            if name in names:
                out[names[name]] = float(value)
        return out

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def conversation_turns(audio_b64: str, answers: list[str], upto: int) -> list[dict]:
    """The messages of turn `upto` (1-based): the clip and question 1, then each answer and the next question."""
    audio = {"type": "input_audio", "input_audio": {"data": audio_b64, "format": "wav"}}
    messages = [{"role": "user", "content": [audio, {"type": "text", "text": QUESTIONS[0]}]}]
    for k in range(1, upto):
        messages += [{"role": "assistant", "content": answers[k - 1]}, {"role": "user", "content": QUESTIONS[k]}]
    return messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the default model)")
    ap.add_argument("--tokens", type=int, default=48, help="max new tokens per answer (greedy)")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of turn 1's clip")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads of the servers")
    ap.add_argument("--repeats", type=int, default=1, help="cold servers started; the best cold run is reported")
    args = ap.parse_args()
    if args.model is None:
        from qwen2audio.bundle.assemble import default_model

        args.model = str(default_model())  # assembled here first when needed, not inside a timed server
    model = args.model
    audio = wav_b64(clip(args.seconds))

    warm = Server(model, args.threads)
    try:
        warm.chat([{"role": "system", "content": "Warm-up."}, {"role": "user", "content": "Hello there."}], 4)
        answers, turns = [], []
        for k in range(1, 5):
            before = warm.counters()
            r = warm.chat(conversation_turns(audio, answers, k), args.tokens)
            after = warm.counters()
            r["prompt"] = after.get("prompt_tokens", 0) - before.get("prompt_tokens", 0)
            r["cached"] = after.get("prompt_tokens_cached", 0) - before.get("prompt_tokens_cached", 0)
            answers.append(r["text"])
            turns.append(r)
    finally:
        warm.close()

    colds = []
    for _ in range(args.repeats):
        cold = Server(model, args.threads)
        try:
            cold.chat([{"role": "system", "content": "Warm-up."}, {"role": "user", "content": "Hello there."}], 4)
            colds.append(cold.chat(conversation_turns(audio, answers, 4), args.tokens))
        finally:
            cold.close()
    best = min(colds, key=lambda r: r["ttft_cpu"])

    print(f"model {model}, clip {args.seconds:g} s, {args.tokens} new tokens per answer, "
          f"OMP_NUM_THREADS={args.threads}")
    print(f"{'turn':<10}{'prompt':>8}{'cached':>8}{'TTFT s':>9}{'CPU-s to 1st':>14}{'turn s':>9}{'turn CPU-s':>12}")
    for k, r in enumerate(turns, 1):
        print(f"{k:<10}{r['prompt']:>8.0f}{r['cached']:>8.0f}{r['ttft']:>9.3f}{r['ttft_cpu']:>14.2f}{r['total']:>9.2f}"
              f"{r['cpu']:>12.2f}")
    print(f"{'cold 4':<10}{turns[3]['prompt']:>8.0f}{0:>8}{best['ttft']:>9.3f}{best['ttft_cpu']:>14.2f}"
          f"{best['total']:>9.2f}{best['cpu']:>12.2f}")
    t4 = turns[3]
    print(f"turn 4 TTFT vs cold prefill of the same prompt: wall {t4['ttft'] / best['ttft']:.2f}x, "
          f"CPU {t4['ttft_cpu'] / max(best['ttft_cpu'], 1e-9):.2f}x (target <= 0.3x)")
    print(f"turn 4 answer identical to the cold one: {t4['text'] == best['text']}")
    if t4["text"] != best["text"]:
        print(f"  warm: {t4['text']!r}\n  cold: {best['text']!r}")


if __name__ == "__main__":
    main()
