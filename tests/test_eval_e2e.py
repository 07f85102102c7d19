"""End to end: the tiny model evaluated on small synthetic sets for every task, in process (--model)
and through a fake OpenAI-compatible server (--endpoint); the AIR-Bench chat judge against a fake
judge; resumption, sharding (by hand and under torchrun), the HTTP client's retries."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import qwen2audio
from qwen2audio.audio import load_audio
from qwen2audio.cli import main as cli_main
from qwen2audio.eval import runner
from qwen2audio.eval.backends import text_after_audio
from qwen2audio.eval.client import ChatClient, EndpointError
from qwen2audio.eval.data import read_qwen_jsonl
from qwen2audio.engine.scheduler import PromptTooLong
from qwen2audio.eval.tasks import SCORERS, get_task

from tiny import sine

TOKENS = 4  # --max-new-tokens for every run: the tiny model's answers are noise anyway
RAW_TASKS = ("asr", "s2tt", "ser", "vsc")


# ---- a fake OpenAI-compatible server on 127.0.0.1 -------------------------------------------------
class FakeOpenAI:
    """Answers /v1/chat/completions with `answer(payload)`; `fail_first` requests get HTTP 503 first."""

    def __init__(self, answer, fail_first: int = 0, status: int = 503):
        self.answer, self.fail_first, self.status = answer, fail_first, status
        self.payloads: list[dict] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.payloads.append(payload)
                    if fake.fail_first > 0:
                        fake.fail_first -= 1
                        return self._send(fake.status, {"error": {"message": "busy, try later"}})
                    content = fake.answer(payload)
                self._send(200, {"id": "x", "object": "chat.completion", "model": payload.get("model"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @contextmanager
    def running(self):
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
            thread.join()


def model_server(pipe):
    """Our tiny model behind the chat API: input_audio parts are decoded by the pipeline itself."""
    return FakeOpenAI(lambda p: pipe.chat(p["messages"], max_new_tokens=p["max_tokens"], temperature=p["temperature"]))


# ---- synthetic benchmark files -----------------------------------------------------------------
def _wav(path: Path, seconds: float, freq: float, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, sine(seconds, freq, seed=seed), 16000, format="FLAC" if path.suffix == ".flac" else "WAV")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="session")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    for i in range(4):
        _wav(root / "audio" / f"c{i}.wav", 0.6 + 0.3 * i, 300 + 150 * i, seed=i)
    asr_prompt = "Detect the language and recognize the speech: <|en|>"
    _jsonl(root / "asr.jsonl", [
        {"audio": "audio/c0.wav", "prompt": asr_prompt, "source": "librispeech_test_clean", "gt": "Hello world."},
        {"audio": "audio/c1.wav", "prompt": asr_prompt, "source": "librispeech_test_clean", "gt": "It's colour."},
        {"audio": "audio/c2.wav", "prompt": "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize "
                                            "the speech: <|zh|>", "source": "aishell2_test_ios", "gt": "我有3个苹果"},
        {"audio": "audio/nowhere.wav", "prompt": asr_prompt, "source": "librispeech_test_clean", "gt": "lost"},
    ])
    _jsonl(root / "s2tt.jsonl", [
        {"audio": "audio/c0.wav", "prompt": "Translate the English speech into Chinese:", "source": "covost2_en_zh_test",
         "gt": "你好世界"},
        {"audio": "audio/c1.wav", "prompt": "Translate the English speech into German:", "source": "covost2_en_de_test",
         "gt": "Hallo Welt"}])
    _jsonl(root / "ser.jsonl", [{"audio": f"audio/c{i}.wav", "prompt": "Recognize the emotion with keywords in English:",
                                 "source": "meld", "gt": g} for i, g in enumerate(["happy", "sad", "neutral"])])
    _jsonl(root / "vsc.jsonl", [{"audio": f"audio/c{i}.wav", "prompt": "Classify the human vocal sound to VocalSound in "
                                 "English:", "source": "vocalsound", "gt": g} for i, g in enumerate(["Cough", "Laughter"])])
    _jsonl(root / "qa.jsonl", [  # an audio-analysis question, and voice chat (no question: it is in the audio)
        {"audio": "audio/c0.wav", "question": "What is the pitch?", "source": "tones", "gt": "300 hertz."},
        {"audio": "audio/c1.wav", "source": "voice_chat", "gt": "2 plus 2 is 4."}])
    # AIR-Bench foundation: one entry names .wav while the file is .flac (the quirk), one has no audio
    found = root / "AIR-Bench" / "Foundation"
    _wav(found / "Sound_AQA_clotho" / "a.wav", 0.8, 440)
    _wav(found / "Sound_AQA_clotho" / "b.flac", 0.9, 520)
    _wav(found / "Music_Genre_Recognition_gtzan" / "c.wav", 1.0, 660)
    q = dict(choice_a="rain", choice_b="a dog", choice_c="a car", choice_d="music")
    (found / "Foundation_meta.json").write_text(json.dumps([
        dict(q, question="What is heard 0?", path="a.wav", answer_gt="a dog", task_name="Sound_AQA",
             dataset_name="clotho", uniq_id=0),
        dict(q, question="What is heard 1?", path="b.wav", answer_gt="rain", task_name="Sound_AQA",
             dataset_name="clotho", uniq_id=1),
        dict(q, question="What is heard 2?", path="c.wav", answer_gt="music", task_name="Music_Genre_Recognition",
             dataset_name="gtzan", uniq_id=2),
        dict(q, question="What is heard 3?", path="gone.wav", answer_gt="rain", task_name="Sound_AQA",
             dataset_name="clotho", uniq_id=3),
    ]))
    chat = root / "AIR-Bench" / "Chat"
    names = ["speech_dialogue_QA", "sound_QA", "music_QA", "speech_and_sound_QA", "speech_and_sound_QA",
             "speech_and_music_QA", "sound_generation_QA"]
    rows = []
    for i, name in enumerate(names):
        _wav(chat / f"{name}_set" / f"{i}.wav", 0.5 + 0.1 * i, 200 + 90 * i)
        rows.append({"path": f"{i}.wav", "question": f"Question {i}?", "answer_gt": f"Reference {i}.", "task_name": name,
                     "dataset_name": "set", "meta_info": f"clip {i}", "uniq_id": i})
    (chat / "Chat_meta.json").write_text(json.dumps(rows))
    mmau = root / "mmau"
    items = []
    for i, (answer, task, diff) in enumerate([("Man", "sound", "easy"), ("Woman", "speech", "hard"),
                                              ("Piano", "music", "medium")]):
        _wav(mmau / "test-mini-audios" / f"m{i}.wav", 0.7, 250 + 100 * i)
        items.append({"id": f"m{i}", "audio_id": f"./test-mini-audios/m{i}.wav", "question": "Who or what is it?",
                      "choices": ["Man", "Woman", "Piano", "Robot"], "answer": answer, "dataset": "x", "task": task,
                      "split": "test-mini", "category": "c", "sub-category": "s", "difficulty": diff})
    (mmau / "mmau-test-mini.json").write_text(json.dumps(items))
    return root


DATA = {"asr": "asr.jsonl", "s2tt": "s2tt.jsonl", "ser": "ser.jsonl", "vsc": "vsc.jsonl", "audio-qa": "qa.jsonl",
        "airbench-foundation": "AIR-Bench", "airbench-chat": "AIR-Bench", "mmau": "mmau/mmau-test-mini.json"}
EXPECTED = {"asr": (3, 1), "s2tt": (2, 0), "ser": (3, 0), "vsc": (2, 0), "audio-qa": (2, 0), "airbench-foundation": (3, 1),
            "mmau": (3, 0)}  # (answered, audio problems)


@pytest.fixture(scope="session")
def pipe(tiny_checkpoint):
    return qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False, truncate=True)


def run_eval(task, bench, out, *extra) -> int:
    return cli_main(["eval", "--task", task, "--data", str(bench / DATA[task]), "--output", str(out),
                     "--max-new-tokens", str(TOKENS), "--batch-size", "2", "--no-progress", *extra])


def results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]


def check_outputs(task, out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    rows = results(out)
    answered, problems = EXPECTED[task]
    assert (summary["answered"], summary["audio_errors"], summary["unanswered"]) == (answered, problems, 0)
    assert len(rows) == answered and all(isinstance(r["response"], str) for r in rows)
    assert summary["metrics"] == json.loads(json.dumps(SCORERS[task](rows)))  # scored from what was saved
    report = (out / "report.md").read_text()
    assert "| set | n | metric | ours | paper | after HF conversion |" in report
    if problems:
        assert all(e["reason"] == "file not found" and e["stage"] == "audio" for e in summary["error_list"])
        assert Path(summary["error_list"][0]["audio"]).name in report
    return summary


def chat_turn(text, wav):
    """One user turn: the audio, then the text (none: voice chat)."""
    return [{"role": "user", "content": [{"type": "audio", "audio": wav}] + ([{"type": "text", "text": text}] if text else [])}]


# ---- every task, in process --------------------------------------------------------------------
def dataset(task, bench) -> dict:
    """item_key -> Item, as the evaluator reads it (its text and resolved audio file)."""
    return {it.key: it for it in get_task(task).read(bench / DATA[task], None)}


@pytest.mark.parametrize("task", list(EXPECTED))
def test_task_with_model(task, bench, tiny_checkpoint, pipe, tmp_path):
    assert run_eval(task, bench, tmp_path, "--model", str(tiny_checkpoint[0])) == 0
    summary = check_outputs(task, tmp_path)
    rows, items = results(tmp_path), dataset(task, bench)
    # The answers are the pipeline's own, one item at a time (so batching changed nothing).
    for r in rows[:2]:
        it = items[r["item_key"]]
        wav = load_audio(it.audio)
        if task in RAW_TASKS:
            assert r["response"] == pipe.complete([it.text], [wav], max_new_tokens=TOKENS)[0]
        else:
            assert r["response"] == pipe.chat(chat_turn(it.text, wav), max_new_tokens=TOKENS)
    if task == "asr":
        assert set(rows[0]) >= {"gt", "response", "source", "audio_path"}  # what the official scorer reads
        assert summary["metrics"]["sources"]["aishell2_test_ios"]["unit"] == "CER"
        assert "LibriSpeech test-clean" in (tmp_path / "report.md").read_text()
    if task == "airbench-foundation":
        assert {r["uniq_id"] for r in rows} == {0, 1, 2}  # uniq_id 1 was found as b.flac
        assert items["1"].audio.endswith("b.flac")
        assert set(rows[0]) >= {"path", "question", "choice_a", "choice_d", "answer_gt", "task_name", "dataset_name"}
    if task == "mmau":
        assert rows[0]["model_prediction"] == rows[0]["response"]
    if task == "audio-qa":
        assert [r["question"] for r in rows] == ["What is the pitch?", ""]
        assert set(summary["metrics"]["sources"]) == {"tones", "voice_chat"}


# ---- every task, through an OpenAI-compatible server --------------------------------------------
@pytest.mark.parametrize("task", list(EXPECTED))
def test_task_with_endpoint(task, bench, pipe, tmp_path):
    with model_server(pipe).running() as server:
        assert run_eval(task, bench, tmp_path, "--endpoint", server.url) == 0
    summary = check_outputs(task, tmp_path)
    assert summary["backend"] == {"kind": "endpoint", "url": server.url + "/chat/completions", "model": "fake-model"}
    assert len(server.payloads) == EXPECTED[task][0]
    sent = {}
    for p in server.payloads:
        assert (p["model"], p["max_tokens"], p["temperature"]) == ("fake-model", TOKENS, 0.0)
        audio, *text = p["messages"][0]["content"]
        text = text[0] if text else {"text": ""}  # voice chat sends the audio alone
        assert audio["type"] == "input_audio" and audio["input_audio"]["format"] == "wav"
        wav, sr = sf.read(io.BytesIO(base64.b64decode(audio["input_audio"]["data"])), dtype="float32")
        assert sr == 16000
        sent.setdefault(text["text"], []).append(wav)
    items = dataset(task, bench)
    for r in results(tmp_path):
        it = items[r["item_key"]]
        # a raw prompt goes as its text after the audio, without the audio block
        text = text_after_audio(it.text) if task in RAW_TASKS else it.text
        assert "<|AUDIO|>" not in text
        # the server got the decoded 16 kHz samples bit for bit
        assert any(np.array_equal(w, load_audio(it.audio)) for w in sent[text])
        assert r["response"] == pipe.chat(chat_turn(text, load_audio(it.audio)), max_new_tokens=TOKENS)
    if task in RAW_TASKS:
        assert "not the paper's raw-prompt protocol" in summary["note"]


def test_foundation_letters_scored_by_the_official_rule(bench, tmp_path):
    replies = {"0": "The answer is B.", "1": "B", "2": "I would say it is music"}  # right, wrong, unparsable
    server = FakeOpenAI(lambda p: replies[p["messages"][0]["content"][1]["text"].split("heard ")[1][0]])
    with server.running():
        assert run_eval("airbench-foundation", bench, tmp_path, "--endpoint", server.url, "--strict") == 0
    m = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert m["tasks"]["Sound_AQA_clotho"] == {"correct": 1, "parsed": 2, "unparsable": 0, "accuracy": 0.5,
                                              "strict_accuracy": 0.5}
    assert m["tasks"]["Music_Genre_Recognition_gtzan"]["strict_accuracy"] == 0.0
    assert (m["accuracy"], m["task_average"], m["strict_task_average"]) == (0.5, 0.5, 0.25)
    report = (tmp_path / "report.md").read_text()
    assert "| average over tasks | 3 | strict_accuracy | 0.2500 |" in report and "counted as wrong" in report


def test_limit_and_unreadable_audio(bench, tmp_path):
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav file")
    rows = [{"audio": str(tmp_path / "broken.wav"), "prompt": "p", "source": "s", "gt": "g"},
            {"audio": str(bench / "audio" / "c0.wav"), "prompt": "p", "source": "s", "gt": "g"},
            {"audio": str(bench / "audio" / "c1.wav"), "prompt": "p", "source": "s", "gt": "g"}]
    _jsonl(tmp_path / "d.jsonl", rows)
    server = FakeOpenAI(lambda p: "g")
    with server.running():
        assert cli_main(["eval", "--task", "vsc", "--data", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "o"),
                         "--endpoint", server.url, "--limit", "2", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert (summary["items"], summary["answered"], summary["audio_errors"]) == (2, 1, 1)
    assert "cannot decode audio" in summary["error_list"][0]["reason"]
    assert summary["metrics"]["sources"]["s"]["accuracy"] == 1.0 and len(server.payloads) == 1


def test_flac_wav_fallback_both_ways(tmp_path):
    from qwen2audio.eval.data import with_other_extension

    _wav(tmp_path / "x.flac", 0.5, 300)
    _wav(tmp_path / "y.wav", 0.5, 300)
    assert with_other_extension(str(tmp_path / "x.wav")) == str(tmp_path / "x.flac")
    assert with_other_extension(str(tmp_path / "y.flac")) == str(tmp_path / "y.wav")
    assert with_other_extension(str(tmp_path / "z.wav")) == str(tmp_path / "z.wav")  # reported missing later


# ---- AIR-Bench chat with a judge -----------------------------------------------------------------
JUDGE_REPLIES = {  # question -> (reply with the reference first, reply with the model's answer first)
    0: ("6 8\nfine", "9 5\nfine"), 1: ("7 4", "5 7"), 2: ("8 8", "6 9"), 3: ("5 6", "7 5"), 4: ("5 2", "3 5"),
    5: ("4 9", "10 4"), 6: ("I cannot rate this.", "5 5"),
}


def fake_judge(payload):
    prompt = payload["messages"][0]["content"]
    i = int(prompt.split("[Question]\n", 1)[1].split("?", 1)[0].split()[-1])
    first = prompt.split("[The Start of Assistant 1's Answer]\n", 1)[1].split("\n[The End", 1)[0]
    return JUDGE_REPLIES[i][0 if first == f"Reference {i}." else 1]


def test_airbench_chat_judged_in_both_orders(bench, pipe, tmp_path):
    judge = FakeOpenAI(fake_judge)
    with model_server(pipe).running() as server, judge.running():
        args = ["--endpoint", server.url, "--judge-base-url", judge.url, "--judge-model", "judge-x",
                "--judge-concurrency", "3"]
        assert run_eval("airbench-chat", bench, tmp_path, *args) == 0
        assert len(server.payloads) == 7 and len(judge.payloads) == 14
        assert {p["model"] for p in judge.payloads} == {"judge-x"}
        m = json.loads((tmp_path / "summary.json").read_text())["metrics"]
        assert m["buckets"]["speech"] == {"model": 8.5, "reference": 5.5, "n": 1}
        assert m["buckets"]["sound"] == {"model": 4.5, "reference": 7.0, "n": 1}  # item 6 failed to parse
        assert m["buckets"]["music"]["model"] == 7.0
        assert m["buckets"]["mixed"]["model"] == pytest.approx(((6.5 + 2.5) / 2 + 9.5) / 2)
        assert (m["parse_failures"], m["parse_failure_keys"]) == (1, ["6"])
        stored = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
        assert {(j["item_key"], j["order"]) for j in stored} == {(str(i), o) for i in range(7)
                                                                   for o in ("reference_first", "model_first")}
        assert any(j["reply"] == "I cannot rate this." and j["scores"] is None for j in stored)
        report = (tmp_path / "report.md").read_text()
        assert "| mixed |" in report and "6.77" in report and "6.42" in report

        # Run again: nothing is generated or judged twice.
        assert run_eval("airbench-chat", bench, tmp_path, *args) == 0
        assert len(server.payloads) == 7 and len(judge.payloads) == 14


def test_airbench_chat_without_judge_keeps_answers_for_later(bench, pipe, tmp_path):
    with model_server(pipe).running() as server:
        assert run_eval("airbench-chat", bench, tmp_path, "--endpoint", server.url) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"] is None and "--judge-base-url" in summary["note"]
    rows = results(tmp_path)
    assert len(rows) == 7 and set(rows[0]) >= {"meta_info", "question", "answer_gt", "path", "task_name",
                                               "dataset_name", "uniq_id", "response"}
    judge = FakeOpenAI(fake_judge)
    with judge.running():  # judge the saved answers later with --merge
        assert cli_main(["eval", "--task", "airbench-chat", "--merge", str(tmp_path), "--judge-base-url", judge.url,
                         "--judge-model", "j", "--no-progress"]) == 0
    assert len(judge.payloads) == 14
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"]["buckets"]["speech"]["model"] == 8.5


# ---- resumption --------------------------------------------------------------------------------
class CountingBackend:
    def __init__(self, crash_on_call: int | None = None):
        self.calls, self.items, self.crash_on_call = 0, [], crash_on_call

    def describe(self):
        return {"kind": "fake"}

    def generate(self, mode, requests):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise RuntimeError("simulated crash")
        self.items += [text for text, _ in requests]
        return [f"answer {len(self.items) - len(requests) + i}" for i in range(len(requests))]


def test_interrupted_run_resumes_without_redoing_items(bench, tmp_path):
    lines = [json.dumps({"audio": f"audio/c{i % 4}.wav", "prompt": f"item {i}:", "source": "s", "gt": "g"})
             for i in range(7)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    items = read_qwen_jsonl(tmp_path / "d.jsonl", audio_root=bench)
    out = tmp_path / "out"
    out.mkdir()
    first = CountingBackend(crash_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.generate("raw", items, first, out, batch_size=2, progress=False)
    assert first.calls == 3 and len(first.items) == 4  # two batches saved, the third lost
    with open(out / "predictions.jsonl", "a") as f:  # and a torn line, as if killed in the middle of a write
        f.write('{"item_key": "5", "resp')

    second = CountingBackend()
    stats = runner.generate("raw", items, second, out, batch_size=2, progress=False)
    assert second.calls == 2 and len(second.items) == 3  # items 5, 6, 7 only
    assert (stats["already_answered"], stats["answered"]) == (4, 3)
    records, failed, missing = runner.merge(items, out)
    assert [r["item_key"] for r in records] == [str(i) for i in range(1, 8)] and not failed and not missing

    third = CountingBackend()
    runner.generate("raw", items, third, out, batch_size=2, progress=False)
    assert third.calls == 0


def test_one_bad_item_is_recorded_not_fatal_but_a_dead_server_is(bench, tmp_path):
    lines = [json.dumps({"audio": "audio/c0.wav", "prompt": f"item {i}:", "source": "s", "gt": "g"}) for i in range(3)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    items = read_qwen_jsonl(tmp_path / "d.jsonl", audio_root=bench)

    class Picky(CountingBackend):
        def generate(self, mode, requests):
            if any("item 1" in text for text, _ in requests):
                raise PromptTooLong("prompt too long for the model")
            return super().generate(mode, requests)

    out = tmp_path / "out"
    out.mkdir()
    stats = runner.generate("raw", items, Picky(), out, batch_size=3, progress=False)
    assert (stats["answered"], stats["model_errors"]) == (2, 1)
    records, failed, _ = runner.merge(items, out)
    assert [r["item_key"] for r in records] == ["1", "3"]
    assert failed == [{"item_key": "2", "audio": items[1].audio, "stage": "model",
                       "reason": "prompt too long for the model"}]

    class Down(CountingBackend):
        def generate(self, mode, requests):
            raise EndpointError("http://x: no answer after 6 attempts (connection refused)")

    with pytest.raises(EndpointError, match="no answer"):
        runner.generate("raw", items, Down(), tmp_path, batch_size=3, progress=False)

    class Buggy(CountingBackend):
        def generate(self, mode, requests):
            raise ValueError("a bug in the backend, not a bad item")

    with pytest.raises(ValueError, match="a bug"):  # not recorded as the item's failure
        runner.generate("raw", items, Buggy(), tmp_path / "bug", batch_size=3, progress=False)


def test_cli_rerun_answers_only_what_is_missing(bench, tiny_checkpoint, tmp_path, monkeypatch):
    from qwen2audio.eval.backends import LocalBackend

    args = ["--model", str(tiny_checkpoint[0])]
    assert run_eval("ser", bench, tmp_path, *args) == 0
    before = results(tmp_path)
    pred = tmp_path / "predictions.jsonl"
    pred.write_text("".join(pred.read_text().splitlines(keepends=True)[:1]))  # lose the last two answers
    calls = []
    real = LocalBackend.generate
    monkeypatch.setattr(LocalBackend, "generate", lambda self, mode, reqs: calls.append(len(reqs)) or real(self, mode, reqs))
    assert run_eval("ser", bench, tmp_path, *args) == 0
    assert calls == [2]
    assert results(tmp_path) == before

    # Other generation settings in the same folder are refused instead of mixed in.
    assert run_eval("ser", bench, tmp_path, *args, "--max-new-tokens", "9") == 2


# ---- sharding ----------------------------------------------------------------------------------
def test_manual_shards_then_last_one_scores(bench, tiny_checkpoint, tmp_path, capsys):
    args = ["--model", str(tiny_checkpoint[0])]
    assert run_eval("asr", bench, tmp_path, *args, "--shard", "1/2") == 0
    assert "not answered yet" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()
    assert run_eval("asr", bench, tmp_path, *args, "--shard", "0/2") == 0
    assert sorted(p.name for p in tmp_path.glob("predictions*")) == ["predictions.shard0of2.jsonl",
                                                                    "predictions.shard1of2.jsonl"]
    summary = check_outputs("asr", tmp_path)
    assert [r["item_key"] for r in results(tmp_path)] == ["1", "2", "3"]  # dataset order, not shard order
    (tmp_path / "summary.json").unlink()
    assert cli_main(["eval", "--task", "asr", "--merge", str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_torchrun_ranks_split_items_and_rank0_scores(bench, pipe, tmp_path):
    with model_server(pipe).running() as server:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "qwen2audio", "eval", "--task", "ser", "--data", str(bench / "ser.jsonl"), "--output",
               str(tmp_path), "--endpoint", server.url, "--max-new-tokens", str(TOKENS), "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = {p.name: [json.loads(x)["item_key"] for x in p.read_text().splitlines()]
             for p in tmp_path.glob("predictions*")}
    assert parts == {"predictions.shard0of2.jsonl": ["1", "3"], "predictions.shard1of2.jsonl": ["2"]}
    check_outputs("ser", tmp_path)
    assert done.stdout.count("# qwen2audio eval: ser") == 1  # only rank 0 reports


# ---- HTTP client and user errors ---------------------------------------------------------------
def test_client_retries_busy_servers_and_stops_on_client_errors():
    naps = []
    busy = FakeOpenAI(lambda p: "ok", fail_first=2)
    with busy.running():
        client = ChatClient(busy.url, retries=3, backoff=0.01, sleep=naps.append)
        assert client.complete([{"role": "user", "content": "hi"}], model="m") == "ok"
    assert len(busy.payloads) == 3 and len(naps) == 2 and naps[1] > naps[0] * 0.9
    bad = FakeOpenAI(lambda p: "ok", fail_first=5, status=400)
    with bad.running():
        with pytest.raises(EndpointError, match="HTTP 400: .*busy, try later"):
            ChatClient(bad.url, retries=3, sleep=naps.append).complete([], model="m")
    assert len(bad.payloads) == 1
    with pytest.raises(EndpointError, match="no answer after 2 attempts"):
        ChatClient(bad.url, retries=1, sleep=lambda s: None, timeout=2).complete([], model="m")  # server closed


def test_user_errors_are_one_line(bench, tmp_path, capsys):
    assert cli_main(["eval", "--task", "asr", "--data", str(bench / "asr.jsonl"), "--output", str(tmp_path),
                     "--model", "m", "--endpoint", "http://127.0.0.1:9"]) == 2
    assert "one of --model DIR and --endpoint URL, not both" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"audio": "a.wav", "prompt": "p"}\n')
    assert cli_main(["eval", "--task", "asr", "--data", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o"),
                     "--endpoint", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1: missing field(s) source, gt" in err[0]
    # A failed start (a wrong checkpoint path) leaves no answers, so the folder can be reused as it is.
    out = tmp_path / "reuse"
    assert run_eval("vsc", bench, out, "--model", str(tmp_path / "no-such-checkpoint")) == 2
    assert "no-such-checkpoint" in capsys.readouterr().err
    server = FakeOpenAI(lambda p: "Cough")
    with server.running():
        assert run_eval("vsc", bench, out, "--endpoint", server.url) == 0
    assert json.loads((out / "summary.json").read_text())["metrics"]["sources"]["vocalsound"]["correct"] == 1


# ---- through the project's own server -----------------------------------------------------------
@pytest.mark.parametrize("task", ["asr", "airbench-foundation"])
def test_task_with_our_server(task, bench, tiny_checkpoint, pipe, tmp_path):
    from server_harness import start_server

    server = start_server(tiny_checkpoint[0])
    try:
        assert run_eval(task, bench, tmp_path, "--endpoint", server.url + "/v1") == 0
    finally:
        server.close()
    check_outputs(task, tmp_path)
    items = dataset(task, bench)
    for r in results(tmp_path):
        it = items[r["item_key"]]
        text = text_after_audio(it.text) if task in RAW_TASKS else it.text
        assert r["response"] == pipe.chat(chat_turn(text, load_audio(it.audio)), max_new_tokens=TOKENS)
