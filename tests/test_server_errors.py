"""Bad requests get a 4xx with an OpenAI-shaped error that says what is wrong, and the server keeps
answering. The server here has small limits so that each one can be hit cheaply."""

import base64
import threading
import time

import httpx
import numpy as np
import pytest
from server_harness import MODEL, input_audio, start_server, wav_bytes
from tiny import sine

LIMITS = dict(max_request_bytes=1 << 20, max_audios=2, max_audio_seconds=20)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "inside.wav").write_bytes(wav_bytes(sine(1.0)))
    outside = tmp_path_factory.mktemp("outside") / "secret.wav"
    outside.write_bytes(wav_bytes(sine(1.0)))
    (root / "link.wav").symlink_to(outside)
    return root, outside


@pytest.fixture(scope="module")
def server(tiny_checkpoint, media_dir):
    from qwen2audio.server.media import MediaPolicy

    srv = start_server(tiny_checkpoint[0], engine_options=dict(max_batch=1, max_queue=1, max_model_len=300),
                       media=MediaPolicy(allowed_local_dir=media_dir[0]), **LIMITS)
    yield srv
    srv.close()


def chat_body(*parts, text="What's that sound?", **extra):
    content = [*parts, {"type": "text", "text": text}]
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def audio_part(url):
    return {"type": "audio_url", "audio_url": {"url": url}}


GOOD_WAV = wav_bytes(sine(1.0))


def _cases(outside, root):
    truncated = GOOD_WAV[:60]
    empty_wav = wav_bytes(np.zeros(0, np.float32))
    long_flac = wav_bytes(np.zeros(25 * 16000, np.float32), "FLAC")  # 25 s, a few kB
    return [
        # (name, request kwargs for httpx, expected status, text the message must contain)
        ("malformed JSON", dict(content=b'{"messages": [', headers={"content-type": "application/json"}), 400,
         "not valid JSON"),
        ("JSON array body", dict(json=[1, 2]), 400, "JSON object"),
        ("empty body", dict(content=b""), 400, "empty"),
        ("no messages", dict(json={"model": MODEL, "messages": []}), 400, "non-empty list"),
        ("bad base64", dict(json=chat_body({"type": "input_audio", "input_audio": {"data": "!!not base64!!",
                                                                                  "format": "wav"}})),
         400, "not valid base64"),
        ("bad base64 data URI", dict(json=chat_body(audio_part("data:audio/wav;base64,%%%"))), 400, "not valid base64"),
        ("data URI not base64", dict(json=chat_body(audio_part("data:audio/wav,abc"))), 400, "base64-encoded"),
        ("truncated wav", dict(json=chat_body(input_audio(truncated))), 400, "audio"),
        ("non-audio bytes", dict(json=chat_body(input_audio(b"this is not audio at all " * 40))), 400, "cannot decode"),
        ("0-byte audio", dict(json=chat_body({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}})),
         400, "empty"),
        ("0-sample wav", dict(json=chat_body(input_audio(empty_wav))), 400, "empty"),
        ("too-short audio", dict(json=chat_body(input_audio(wav_bytes(sine(0.01))))), 400, "too short"),
        ("too many audios", dict(json=chat_body(*[input_audio(GOOD_WAV)] * 3)), 400, "at most 2"),
        ("too much audio", dict(json=chat_body(input_audio(long_flac, "flac"))), 400, "at most 20 s"),
        ("oversize body", dict(json=chat_body(input_audio(b"x" * (1 << 20)))), 413, "larger than"),
        ("oversize chunked body", dict(content=iter([b"{" + b" " * 65536] * 20), headers={"content-type": "application/json"}),
         413, "larger than"),
        ("forbidden absolute path", dict(json=chat_body(audio_part(f"file://{outside}"))), 403, "outside"),
        ("path escape with ..", dict(json=chat_body(audio_part(f"../{outside.parent.name}/{outside.name}"))), 403,
         "outside"),
        ("symlink out of the media dir", dict(json=chat_body(audio_part("link.wav"))), 403, "outside"),
        ("missing local file", dict(json=chat_body(audio_part(f"file://{root}/nonexistent.wav"))), 400, "not found"),
        # outside the directory, existing or not, the answer is the same: no oracle for the server's files
        ("existing file outside", dict(json=chat_body(audio_part("file:///etc/passwd"))), 403, "outside"),
        ("missing file outside", dict(json=chat_body(audio_part("file:///etc/nonexistent"))), 403, "outside"),
        ("missing dir outside", dict(json=chat_body(audio_part("/nonexistent/x.wav"))), 403, "outside"),
        ("100,000-deep JSON", dict(content=b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                   headers={"content-type": "application/json"}), 400, "too deeply"),
        ("bare string audio_url", dict(json=chat_body({"type": "audio_url", "audio_url": "data:audio/wav;base64,"
                                                       + base64.b64encode(GOOD_WAV).decode()})), 400,
         "must be an object"),
        ("repetition_penalty 1e-300", dict(json=chat_body(repetition_penalty=1e-300, temperature=1)), 400,
         "repetition_penalty"),
        ("repetition_penalty 1e300", dict(json=chat_body(repetition_penalty=1e300)), 400, "repetition_penalty"),
        ("temperature a 400-digit integer", dict(content=b'{"messages": [{"role": "user", "content": "hi"}], '
                                                         b'"temperature": 1' + b"0" * 400 + b"}",
                                                 headers={"content-type": "application/json"}), 400, "temperature"),
        ("top_p 0", dict(json=chat_body(top_p=0)), 400, "top_p"),
        ("top_k a float", dict(json=chat_body(top_k=2.5)), 400, "top_k"),
        ("top_logprobs without logprobs", dict(json=chat_body(top_logprobs=2)), 400, "needs logprobs"),
        ("top_logprobs 21", dict(json=chat_body(logprobs=True, top_logprobs=21)), 400, "top_logprobs"),
        ("logprobs not a bool", dict(json=chat_body(logprobs="yes")), 400, "logprobs"),
        ("remote URL without the flag", dict(json=chat_body(audio_part("http://127.0.0.1:9/a.wav"))), 403,
         "--allow-remote-audio"),
        ("unsupported URL scheme", dict(json=chat_body(audio_part("ftp://127.0.0.1/a.wav"))), 400, "scheme"),
        ("n=2", dict(json=chat_body(n=2)), 400, "n=2"),
        ("negative max_tokens", dict(json=chat_body(max_tokens=-5)), 400, "max_tokens"),
        ("max_tokens not an integer", dict(json=chat_body(max_tokens="ten")), 400, "max_tokens must be an integer"),
        ("unknown role", dict(json={"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}), 400, "role"),
        ("content not text or parts", dict(json={"model": MODEL, "messages": [{"role": "user", "content": 5}]}), 400,
         "content"),
        ("image part", dict(json=chat_body({"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}})),
         400, "image_url"),
        ("temperature out of range", dict(json=chat_body(temperature=5)), 400, "temperature"),
        ("stream not a bool", dict(json=chat_body(stream="yes")), 400, "stream"),
        ("seed out of range", dict(json=chat_body(seed=2**70)), 400, "seed"),
        ("stop not strings", dict(json=chat_body(stop=[1, 2])), 400, "stop"),
        ("input_audio not an object", dict(json=chat_body({"type": "input_audio", "input_audio": "abc"})), 400,
         "must be an object"),
        ("tools", dict(json=chat_body(tools=[{"type": "function", "function": {"name": "f"}}])), 400, "tools"),
        ("wrong model", dict(json={**chat_body(), "model": "gpt-4o"}), 404, "does not exist"),
        ("prompt too long", dict(json=chat_body(input_audio(wav_bytes(sine(12.0))))), 400, "context limit"),
        ("max_tokens too large", dict(json=chat_body(max_tokens=290)), 400, "ask for at most"),
    ]


def test_bad_chat_requests_get_clear_4xx_answers(server, media_dir):
    url = f"{server.url}/v1/chat/completions"
    failures = []
    with httpx.Client(timeout=60) as http:
        for name, kwargs, status, text in _cases(media_dir[1], media_dir[0]):
            try:
                r = http.post(url, **kwargs)
            except httpx.HTTPError as e:
                failures.append(f"{name}: transport error {e!r}")
                continue
            err = r.json().get("error", {}) if r.headers.get("content-type", "").startswith("application/json") else {}
            if r.status_code != status or text not in str(err.get("message")) or not err.get("type"):
                failures.append(f"{name}: {r.status_code} {r.text[:300]}")
            assert http.get(f"{server.url}/health").json()["status"] == "ok", name
    assert not failures, "\n".join(failures)
    # and real requests still work, including a local file inside the allowed directory
    with httpx.Client(timeout=60) as http:
        inline = http.post(url, json=chat_body(input_audio(GOOD_WAV), temperature=0)).json()
        local = http.post(url, json=chat_body(audio_part("inside.wav"), temperature=0)).json()
    assert inline["choices"][0]["message"]["content"] == local["choices"][0]["message"]["content"]


def test_bad_transcription_requests(server):
    url = f"{server.url}/v1/audio/transcriptions"
    cases = [
        ("no file", dict(data={"model": MODEL}), 400, "field 'file'"),
        ("JSON instead of a form", dict(json={"file": "x"}), 400, "field 'file'"),
        ("empty file", dict(files={"file": ("a.wav", b"")}, data={"model": MODEL}), 400, "empty"),
        ("not audio", dict(files={"file": ("a.wav", b"hello" * 100)}, data={"model": MODEL}), 400, "cannot decode"),
        ("srt format", dict(files={"file": ("a.wav", GOOD_WAV)}, data={"response_format": "srt"}), 400, "srt"),
        ("bad language", dict(files={"file": ("a.wav", GOOD_WAV)}, data={"language": "english please"}), 400,
         "language"),
        ("wrong model", dict(files={"file": ("a.wav", GOOD_WAV)}, data={"model": "whisper-1"}), 404, "does not exist"),
        ("malformed multipart", dict(content=b"--x\r\nContent-Disposition: form-data\r\n\r\nzzz",
                                     headers={"content-type": "multipart/form-data; boundary=x"}), 400, ""),
    ]
    with httpx.Client(timeout=60) as http:
        for name, kwargs, status, text in cases:
            r = http.post(url, **kwargs)
            assert r.status_code == status and text in r.json()["error"]["message"], (name, r.status_code, r.text)
        assert http.get(f"{server.url}/nothing-here").json()["error"]["type"] == "not_found_error"
        assert http.post(f"{server.url}/health").status_code == 405
        ok = http.post(url, files={"file": ("a.wav", GOOD_WAV)}, data={"model": MODEL})
        assert ok.status_code == 200 and isinstance(ok.json()["text"], str)


def test_full_queue_answers_429_and_recovers(server):
    url = f"{server.url}/v1/chat/completions"
    long = {"model": MODEL, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 250,
            "temperature": 0, "ignore_eos": True, "stream": True}
    waiting_result = {}

    def second():
        waiting_result["r"] = httpx.post(url, timeout=60, json={**long, "stream": False, "max_tokens": 5})

    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url, json=long) as running:  # holds the only slot
            lines = running.iter_lines()
            next(lines)
            t = threading.Thread(target=second)
            t.start()
            deadline = time.monotonic() + 20
            while http.get(f"{server.url}/health").json()["waiting"] != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert http.get(f"{server.url}/health").json()["waiting"] == 1
            r = http.post(url, json={**long, "stream": False})
            assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
            assert r.headers["retry-after"] == "1"
        t.join(60)  # closing the stream freed the slot: the waiting request ran
    assert waiting_result["r"].status_code == 200
    assert waiting_result["r"].json()["usage"]["completion_tokens"] == 5


def test_a_path_outside_the_media_dir_is_refused_before_the_filesystem_is_asked(media_dir, monkeypatch):
    """No existence oracle: /etc/passwd and /etc/nonexistent get the same 403, decided from the text alone."""
    import os
    import pathlib

    from qwen2audio.server.errors import APIError
    from qwen2audio.server.media import MediaPolicy, local_path

    policy = MediaPolicy(allowed_local_dir=media_dir[0])

    def touched(*args, **kwargs):
        raise AssertionError("the filesystem was asked about a path outside the media directory")

    for name in ("resolve", "exists", "is_file", "stat", "lstat"):
        monkeypatch.setattr(pathlib.Path, name, touched)
    monkeypatch.setattr(os, "stat", touched)
    monkeypatch.setattr(os, "lstat", touched)
    answers = set()
    for path in ("/etc/passwd", "/etc/nonexistent", f"{media_dir[0]}/../outside0/secret.wav", "../../etc/passwd"):
        with pytest.raises(APIError) as err:
            local_path(path, policy, "p")
        assert err.value.status == 403 and err.value.code == "forbidden_path"
        answers.add(err.value.message.replace(path, "PATH"))
    assert len(answers) == 1
