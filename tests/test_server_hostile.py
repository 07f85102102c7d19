"""Hostile requests (issue 20): a decode bomb costs memory bounded by the limit and the compressed size,
not by the hours of audio it claims; a 20 MB text message never freezes the event loop."""

import io
import threading
import time
import tracemalloc

import httpx
import numpy as np
import pytest
import soundfile as sf
from server_harness import MODEL, input_audio, start_server

LIMIT_S = 60


def silent_flac(hours: float, sr: int = 16000) -> bytes:
    """Hours of silence in a few hundred kB of FLAC, written a minute at a time."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=sr, channels=1, format="FLAC") as f:
        minute = np.zeros(sr * 60, np.float32)
        for _ in range(round(hours * 60)):
            f.write(minute)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb():
    return silent_flac(2.0)  # 2 h: 460 MB as 16 kHz float32, about 360 kB compressed


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory, bomb):
    from qwen2audio.server.media import MediaPolicy

    media = tmp_path_factory.mktemp("bombs")
    (media / "bomb.flac").write_bytes(bomb)
    srv = start_server(tiny_checkpoint[0], media=MediaPolicy(allowed_local_dir=media), max_audio_seconds=LIMIT_S)
    yield srv
    srv.close()


def traced(call):
    """(result, seconds, peak bytes Python and numpy allocated meanwhile, in every thread of this process)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        out = call()
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, elapsed, peak


@pytest.mark.parametrize("via", ["input_audio", "file_url", "transcription"])
def test_decode_bomb_memory_is_bounded_by_the_compressed_size(server, bomb, via):
    decoded = 2 * 3600 * 16000 * 4  # what decoding it whole would hold
    url = f"{server.url}/v1/chat/completions"
    if via == "transcription":
        def call():
            return httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": ("b.flac", bomb)},
                              data={"model": MODEL}, timeout=60)
    else:
        part = input_audio(bomb, "flac") if via == "input_audio" else \
            {"type": "audio_url", "audio_url": {"url": "file://" + str(server_media(server) / "bomb.flac")}}
        body = {"model": MODEL, "messages": [{"role": "user", "content": [part]}], "max_tokens": 2}

        def call():
            return httpx.post(url, json=body, timeout=60)

    r, elapsed, peak = traced(call)
    assert r.status_code == 400 and f"at most {LIMIT_S} s" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["code"] == "audio_too_long"
    # the body (base64: 4/3 of the file), its parsed copy, the file's bytes, and LIMIT_S of 16 kHz audio
    bound = 6 * len(bomb) + LIMIT_S * 16000 * 4 + 8 * 2**20
    assert peak < bound and peak * 20 < decoded, (peak, bound, len(bomb))
    assert elapsed < 5, elapsed  # decoding stopped at the limit (the whole file took 5.6 s, 7 h took 20 s)


def server_media(server):
    return server.app.state.config.media.allowed_local_dir


@pytest.mark.parametrize("shape", ["one 20 MB message", "300,000 short messages"])
def test_health_answers_within_a_second_while_a_huge_text_request_is_handled(server, shape):
    if shape == "one 20 MB message":
        messages = [{"role": "user", "content": "hello world " * (20 * 2**20 // 12)}]
    else:
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 150_000
    result = {}

    def big():
        result["r"] = httpx.post(f"{server.url}/v1/chat/completions", timeout=120,
                                 json={"model": MODEL, "messages": messages})

    worker = threading.Thread(target=big)
    latencies = []
    with httpx.Client(timeout=30) as http:
        http.get(f"{server.url}/health")  # connection open before the clock starts
        worker.start()
        while worker.is_alive():
            start = time.perf_counter()
            assert http.get(f"{server.url}/health").json()["status"] == "ok"
            latencies.append(time.perf_counter() - start)
            time.sleep(0.05)
        worker.join()
    r = result["r"]
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert latencies and max(latencies) < 1.0, latencies
    # a message that fits is still tokenised and answered
    ok = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_a_bug_is_a_500_with_its_traceback_in_the_log_not_a_400(server, monkeypatch, caplog):
    import qwen2audio.server.app as app_module

    def stray(*args, **kwargs):
        raise ValueError("a stray ValueError, not the user's mistake")

    monkeypatch.setattr(app_module, "prepare_chat", stray)
    with caplog.at_level("ERROR", logger="qwen2audio.server"):
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    logged = [rec for rec in caplog.records if rec.exc_info and "stray ValueError" in str(rec.exc_info[1])]
    assert logged, caplog.text
