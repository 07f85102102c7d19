"""The web page in headless Chromium (Playwright driving the system's /usr/bin/chromium): upload a wav,
send, watch the answer stream in, and compare it with the Python API's greedy answer."""

import os

import pytest
from server_harness import MODEL, input_audio, wav_bytes
from tiny import sine

import qwen2audio

CHROMIUM = os.environ.get("QWEN2AUDIO_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

# Text of the newest assistant bubble; textContent keeps every character exactly (innerText would
# normalise whitespace).
LAST_ANSWER = "() => { const all = document.querySelectorAll('.msg.assistant .text'); " \
              "return all.length ? all[all.length - 1].textContent : null; }"
WATCH = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const all = document.querySelectorAll('.msg.assistant .text');
    if (all.length) window.__lengths.push(all[all.length - 1].textContent.length);
  }).observe(document.getElementById('history'), {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def playwright():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: apt-get install -y chromium"
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright):
    b = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    yield b
    b.close()


def test_page_uploads_audio_and_streams_the_answer(server, browser, tiny_checkpoint, tmp_path):
    pipe = qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False)
    data = wav_bytes(sine(2.0, 440, seed=31))
    path = tmp_path / "clip.wav"
    path.write_bytes(data)
    question, follow_up = "What's that sound?", "Describe it in detail, please."
    turn1 = [{"role": "user", "content": [input_audio(data), {"type": "text", "text": question}]}]
    expected1 = pipe.chat(turn1, max_new_tokens=200)
    turn2 = turn1 + [{"role": "assistant", "content": expected1}, {"role": "user", "content": follow_up}]
    expected2 = pipe.chat(turn2, max_new_tokens=40)

    page = browser.new_page()
    problems = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.goto(server.url)
    page.wait_for_function(f"document.getElementById('model').textContent.startsWith('{MODEL}')")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#attachments li")
    assert "clip.wav" in page.inner_text("#attachments")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "200")
    page.fill("#prompt", question)
    page.evaluate(WATCH)
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
    assert page.evaluate(LAST_ANSWER) == expected1
    lengths = page.evaluate("window.__lengths")
    assert any(0 < n < len(expected1) for n in lengths), lengths  # partial text was shown before the end
    assert page.locator(".msg.user audio").count() == 1  # the uploaded clip is playable in the history
    assert "200 tokens" in page.inner_text("#status")

    # second turn, text only: the page re-sends the whole conversation, audio included
    counters = server.engine.counters
    encoded, cached = counters["audio_windows_encoded"], counters["prompt_tokens_cached"]
    page.fill("#max-tokens", "40")
    page.fill("#prompt", follow_up)
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length == 2",
                           timeout=60_000)
    assert page.evaluate(LAST_ANSWER) == expected2
    # the clip is not encoded again: the prefix cache holds turn 1's blocks, audio positions included
    assert counters["audio_windows_encoded"] == encoded
    assert counters["prompt_tokens_cached"] > cached
    assert not problems, problems
    page.close()


def test_page_shows_server_errors(server, browser, tmp_path):
    path = tmp_path / "noise.wav"
    path.write_bytes(b"definitely not audio" * 50)
    page = browser.new_page()
    page.goto(server.url)
    page.wait_for_function(f"document.getElementById('model').textContent.startsWith('{MODEL}')")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("#attachments li")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=error]", timeout=30_000)
    assert "cannot decode audio" in page.evaluate(LAST_ANSWER)
    assert page.is_enabled("#send")  # ready for the next message
    page.close()


def test_microphone_recording_is_sent_as_webm(server, playwright, tiny_checkpoint):
    """Chromium's fake microphone (a beep) -> MediaRecorder (webm/opus) -> input_audio -> PyAV on the server;
    the answer equals the Python API's on the very bytes the page sent."""
    import base64
    import json

    b = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS + ["--use-fake-ui-for-media-stream",
                                                                         "--use-fake-device-for-media-stream"])
    try:
        page = b.new_page()
        sent = []
        page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/v1/chat/completions") else None)
        page.goto(server.url)
        page.wait_for_function(f"document.getElementById('model').textContent.startsWith('{MODEL}')")
        page.click("#record")
        page.wait_for_selector("#record.recording")
        page.wait_for_timeout(1500)
        page.click("#record")
        page.wait_for_selector("#attachments li")
        assert ".webm" in page.inner_text("#attachments")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "12")
        page.click("#send")
        page.wait_for_selector(".msg.assistant[data-state=done]", timeout=60_000)
        answer = page.evaluate(LAST_ANSWER)
    finally:
        b.close()
    part = json.loads(sent[0])["messages"][0]["content"][0]
    assert part["type"] == "input_audio" and part["input_audio"]["format"] == "webm"
    webm = base64.b64decode(part["input_audio"]["data"])
    assert webm[:4] == b"\x1a\x45\xdf\xa3"  # EBML magic: a real WebM container
    pipe = qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False)
    expected = pipe.chat([{"role": "user", "content": [{"type": "audio", "audio": webm}]}], max_new_tokens=12)
    assert answer == expected and answer
