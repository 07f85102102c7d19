"""Remote audio URLs: refused unless the operator allows them, then fetched with a timeout and a
size cap (a local http server on 127.0.0.1 stands in for the web)."""

import http.server
import threading
import time

import httpx
import pytest
from server_harness import MODEL, input_audio, start_server, wav_bytes
from tiny import sine

CLIP = wav_bytes(sine(1.5, 610, seed=21))
BIG = wav_bytes(sine(20.0, seed=22))  # ~640 kB, over the 200 kB cap below


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow.wav":
            time.sleep(3)
        body = {"/clip.wav": CLIP, "/big.wav": BIG, "/slow.wav": CLIP}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        if self.path != "/big.wav":  # the big one is sent without a length: the cap must count bytes
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def audio_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    from qwen2audio.server.media import MediaPolicy

    srv = start_server(tiny_checkpoint[0], media=MediaPolicy(allow_remote=True, remote_timeout=1.0,
                                                              max_audio_bytes=200_000))
    yield srv
    srv.close()


def ask(part):
    return {"model": MODEL, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What's that sound?"}]}]}


def url_part(url):
    return {"type": "audio_url", "audio_url": {"url": url}}


def test_remote_audio_with_the_flag(server, audio_host):
    url = f"{server.url}/v1/chat/completions"
    with httpx.Client(timeout=60) as http:
        remote = http.post(url, json=ask(url_part(f"{audio_host}/clip.wav")))
        inline = http.post(url, json=ask(input_audio(CLIP)))
        assert remote.status_code == 200, remote.text
        assert remote.json()["choices"][0]["message"]["content"] == inline.json()["choices"][0]["message"]["content"]
        for path, status, text in [("/missing.wav", 400, "HTTP 404"), ("/big.wav", 413, "larger than 200000"),
                                   ("/slow.wav", 400, "timed out")]:
            r = http.post(url, json=ask(url_part(f"{audio_host}{path}")))
            assert r.status_code == status and text in r.json()["error"]["message"], (path, r.text)
        local = http.post(url, json=ask(url_part("file:///etc/hostname")))  # no --allowed-local-media-path
        assert local.status_code == 403 and "--allowed-local-media-path" in local.json()["error"]["message"]
        assert http.get(f"{server.url}/health").json()["status"] == "ok"
