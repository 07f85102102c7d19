"""The real server (uvicorn on 127.0.0.1) through the official `openai` client; answers compared with
`qwen2audio.load(dir).chat(...)` greedy results."""

import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from server_harness import MODEL, audio_url, input_audio, metric, wav_bytes
from tiny import sine

import qwen2audio


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False)


def ask(part, text="What's that sound?"):
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def streamed(client, messages, **kw):
    pieces, finish, usage, roles = [], None, None, []
    for ch in client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                             stream_options={"include_usage": True}, **kw):
        assert ch.object == "chat.completion.chunk"
        if ch.usage is not None:
            usage = ch.usage
        if ch.choices:
            delta = ch.choices[0].delta
            roles += [delta.role] if delta.role else []
            pieces.append(delta.content or "")
            finish = ch.choices[0].finish_reason or finish
    return "".join(pieces), finish, usage, roles


@pytest.mark.parametrize("part_of", [input_audio, audio_url], ids=["input_audio", "audio_url"])
def test_chat_with_audio_streamed_and_not(server, pipe, part_of):
    data = wav_bytes(sine(2.5, 370, seed=11))
    messages = ask(part_of(data))
    expected = pipe.chat(messages, max_new_tokens=16)
    prompt_len = pipe.processor.prepare_chats([messages])["input_ids"].shape[1]
    client = server.client()

    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.object == "chat.completion" and r.model == MODEL
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt_len, 16, prompt_len + 16)

    text, finish, usage, roles = streamed(client, messages, max_completion_tokens=16, temperature=0)
    assert text == expected and finish == "length" and roles == ["assistant"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_len, 16)


def test_multi_turn_conversation_reuses_encoded_audio(server, pipe):
    client = server.client()
    clip = input_audio(wav_bytes(sine(3.0, 250, seed=12)))
    turn1 = ask(clip)
    first = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=10, temperature=0)
    answer = first.choices[0].message.content
    assert answer == pipe.chat(turn1, max_new_tokens=10)
    before = httpx.get(f"{server.url}/metrics").text
    hits = metric(before, "qwen2audio_audio_cache_hits_total")
    reused = metric(before, "qwen2audio_prefix_cache_hit_tokens_total")
    turn2 = turn1 + [{"role": "assistant", "content": answer},
                     {"role": "user", "content": [clip, {"type": "text", "text": "And now, in detail?"}]},
                     ]
    second = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=10, temperature=0)
    assert second.choices[0].message.content == pipe.chat(turn2, max_new_tokens=10)
    after = httpx.get(f"{server.url}/metrics").text
    # turn 1 (the clip included) is in the prefix cache: its keys/values are reused, its audio not even looked up;
    # the clip's second copy in turn 2 is new to the KV cache, and its encoding comes from the audio cache
    assert metric(after, "qwen2audio_audio_cache_hits_total") == hits + 1
    assert metric(after, "qwen2audio_prefix_cache_hit_tokens_total") - reused >= 75  # the clip's 75 tokens
    text_turn = turn2 + [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "hello world"}]
    third = client.chat.completions.create(model=MODEL, messages=text_turn, max_tokens=6, temperature=0)
    assert third.choices[0].message.content == pipe.chat(text_turn, max_new_tokens=6)


def test_transcription_upload(server, pipe):
    wav = sine(4.0, 500, seed=13)
    data = wav_bytes(wav)
    client = server.client()
    for language in ("en", None):
        kw = {"language": language} if language else {}
        t = client.audio.transcriptions.create(model=MODEL, file=("speech.wav", data, "audio/wav"), **kw)
        assert t.text == pipe.transcribe(wav, language=language, max_new_tokens=256)
    text = client.audio.transcriptions.create(model=MODEL, file=("speech.flac", wav_bytes(wav, "FLAC")),
                                              language="en", response_format="text")
    assert text.strip() == pipe.transcribe(wav, language="en", max_new_tokens=256)


def test_32_concurrent_greedy_requests_equal_their_answers_alone(server, pipe):
    n = 32
    convs = [ask(input_audio(wav_bytes(sine(0.6 + 0.15 * i, 150 + 37 * i, seed=100 + i))),
                 ["What's that sound?", "Describe it.", "Transcribe the speech."][i % 3]) for i in range(n)]
    budgets = [4 + (i * 7) % 20 for i in range(n)]
    expected = [pipe.chat(c, max_new_tokens=b) for c, b in zip(convs, budgets)]
    got, errors = [None] * n, []
    client = server.client()
    start = threading.Barrier(n)

    def worker(i):
        try:
            start.wait()
            if i % 2:
                r = client.chat.completions.create(model=MODEL, messages=convs[i], max_tokens=budgets[i], temperature=0)
                got[i] = r.choices[0].message.content
            else:
                got[i] = streamed(client, convs[i], max_tokens=budgets[i], temperature=0)[0]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    assert got == expected
    assert len(set(expected)) > n // 2
    assert server.engine.counters["peak_running"] > 1  # they really ran side by side


def test_client_disconnect_frees_its_slot(server):
    before = httpx.get(f"{server.url}/metrics").text
    cancelled = metric(before, 'qwen2audio_engine_finished_total{reason="cancelled"}')
    body = {"model": MODEL, "messages": ask(input_audio(wav_bytes(sine(1.0)))), "max_tokens": 3500,
            "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(6)]  # a few chunks: the request is running
            assert any('"content"' in line for line in got)
            assert httpx.get(f"{server.url}/health").json()["running"] == 1
        # leaving the block closes the connection mid-stream
    text = wait_for_cancellations(server, cancelled + 1)
    assert metric(text, "qwen2audio_kv_cache_free_slots") == metric(text, "qwen2audio_kv_cache_slots")
    assert metric(text, 'qwen2audio_requests_total{endpoint="chat",status="499"}') >= 1


def wait_for_cancellations(server, expected: int) -> str:
    """Poll /metrics until the engine has cancelled `expected` requests and runs none; return the metrics text."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        if metric(text, 'qwen2audio_engine_finished_total{reason="cancelled"}') == expected:
            break
        time.sleep(0.05)
    assert metric(text, 'qwen2audio_engine_finished_total{reason="cancelled"}') == expected
    assert metric(text, "qwen2audio_running_requests") == 0
    return text


def test_non_streamed_request_is_cancelled_when_the_client_gives_up(server):
    cancelled = metric(httpx.get(f"{server.url}/metrics").text, 'qwen2audio_engine_finished_total{reason="cancelled"}')
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 3900,
            "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    wait_for_cancellations(server, cancelled + 1)


def test_sampling_options_over_http(server, pipe):
    client = server.client()
    messages = ask(input_audio(wav_bytes(sine(2.0, 420, seed=14))))
    greedy = pipe.chat(messages, max_new_tokens=20)
    stop = greedy[6:9]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stop=stop)
    assert r.choices[0].message.content == greedy[: greedy.find(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model=MODEL, messages=messages, max_tokens=20, temperature=1.3, top_p=0.9, seed=5)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b == pipe.chat(messages, max_new_tokens=20, temperature=1.3, top_p=0.9, seed=5)
    assert a != greedy


def test_models_health_metrics_and_page(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("qwen2audio_requests_total", "qwen2audio_generation_tokens_total", "qwen2audio_prompt_tokens_total",
                 "qwen2audio_queue_depth", "qwen2audio_running_requests",
                 "qwen2audio_time_to_first_token_seconds_bucket", "qwen2audio_e2e_request_latency_seconds_count"):
        assert f"\n{name}" in text, name
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    js = httpx.get(f"{server.url}/static/app.js")
    assert js.status_code == 200 and "getReader" in js.text and "MediaRecorder" in js.text


def test_serve_command_runs_the_server(tiny_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "qwen2audio", "serve", "--model", str(tiny_checkpoint[0]), "--port", str(port),
           "--max-batch", "2", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert health is not None, proc.stdout.read() if proc.poll() is not None else "no answer"
        assert health["model"] == tiny_checkpoint[0].name and health["free_slots"] == 2
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hello world"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    finally:
        proc.terminate()
        proc.wait(15)
