"""Prometheus text exposition (format 0.0.4), written by hand: a few counters, gauges and histograms
are all the server needs, and it keeps the dependency list short."""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)  # per bucket (not cumulative) + the rest in `count`
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.count += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for le, c in zip(self.buckets, self.counts):
            running += c
            out.append(f'{name}_bucket{{le="{le:g}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class ServerMetrics:
    """Request-level numbers the HTTP layer sees; engine numbers are read from `engine.stats()`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = defaultdict(int)  # (endpoint, status) -> count
        self.ttft = Histogram()
        self.e2e = Histogram()

    def record(self, endpoint: str, status: int | str, ttft: float | None = None, e2e: float | None = None) -> None:
        with self.lock:
            self.requests[(endpoint, str(status))] += 1
            if ttft is not None:
                self.ttft.observe(ttft)
            if e2e is not None:
                self.e2e.observe(e2e)

    def render(self, stats: dict) -> str:
        def family(name, kind, help_, samples):
            return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples]

        with self.lock:
            lines = family("qwen2audio_requests_total", "counter",
                           "HTTP requests by endpoint and status code (499: the client went away).",
                           [f'qwen2audio_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                            for (e, s), n in sorted(self.requests.items())])
            lines += family("qwen2audio_time_to_first_token_seconds", "histogram",
                            "From request arrival to the first generated token.", self.ttft.lines(
                                "qwen2audio_time_to_first_token_seconds"))
            lines += family("qwen2audio_e2e_request_latency_seconds", "histogram",
                            "From request arrival to the last generated token.", self.e2e.lines(
                                "qwen2audio_e2e_request_latency_seconds"))
        scalar = [
            ("qwen2audio_prompt_tokens_total", "counter", "Prompt tokens prefilled.", stats.get("prompt_tokens", 0)),
            ("qwen2audio_generation_tokens_total", "counter", "Tokens generated.", stats.get("generated_tokens", 0)),
            ("qwen2audio_queue_depth", "gauge", "Requests waiting for a KV-cache slot.", stats["waiting"]),
            ("qwen2audio_running_requests", "gauge", "Requests in the running batch.", stats["running"]),
            ("qwen2audio_kv_cache_slots", "gauge", "KV-cache slots (the largest running batch).", stats["slots"]),
            ("qwen2audio_kv_cache_free_slots", "gauge", "KV-cache slots free now.", stats["free_slots"]),
            ("qwen2audio_audio_cache_hits_total", "counter", "Audio windows whose encoding came from the cache.",
             stats["audio_cache_hits"]),
            ("qwen2audio_audio_cache_misses_total", "counter", "Audio windows encoded by the audio tower.",
             stats["audio_cache_misses"]),
            ("qwen2audio_engine_steps_total", "counter", "Engine steps run.", stats.get("steps", 0)),
            ("qwen2audio_prefix_cache_hit_tokens_total", "counter",
             "Prompt tokens whose keys/values came from the prefix cache.", stats.get("prompt_tokens_cached", 0)),
            ("qwen2audio_kv_cache_blocks_free", "gauge", "Paged KV-cache blocks free now (cached ones included).",
             stats.get("kv_blocks_free", 0)),
            ("qwen2audio_engine_preemptions_total", "counter", "Running requests preempted for KV-cache blocks.",
             stats.get("preemptions", 0)),
        ]
        for name, kind, help_, value in scalar:
            lines += family(name, kind, help_, [f"{name} {value}"])
        reasons = ("stop", "length", "cancelled", "error")
        lines += family("qwen2audio_engine_finished_total", "counter", "Engine requests finished, by reason.",
                        [f'qwen2audio_engine_finished_total{{reason="{r}"}} {stats.get("finished_" + r, 0)}'
                         for r in reasons])
        return "\n".join(lines) + "\n"
