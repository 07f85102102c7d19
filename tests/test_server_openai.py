"""OpenAI conformance through the official `openai` client (issue 20): transcription streaming, language
validation, verbose_json, logprobs streamed and not, the object form of audio_url."""

import math

import numpy as np
import openai
import pytest
import torch
from server_harness import MODEL, input_audio, wav_bytes
from tiny import sine

import qwen2audio
from qwen2audio.engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False)


CLIP = sine(3.0, 420, seed=5)


def test_transcription_stream_gives_delta_events_then_done(server, pipe):
    client = server.client()
    data = wav_bytes(CLIP)
    whole = client.audio.transcriptions.create(model=MODEL, file=("a.wav", data), language="en").text
    assert whole == pipe.transcribe(CLIP, language="en", max_new_tokens=256)
    events = list(client.audio.transcriptions.create(model=MODEL, file=("a.wav", data), language="en", stream=True))
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) <= {"transcript.text.delta"}
    assert len(kinds) > 2  # streamed in pieces, not one event at the end
    assert "".join(e.delta for e in events[:-1]) == events[-1].text == whole
    assert events[-1].usage.output_tokens > 0


def test_transcription_language_must_be_one_the_model_knows(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="not one this model transcribes"):
        client.audio.transcriptions.create(model=MODEL, file=("a.wav", wav_bytes(CLIP)), language="hh")
    assert isinstance(client.audio.transcriptions.create(model=MODEL, file=("a.wav", wav_bytes(CLIP)),
                                                         language="yue").text, str)


def test_verbose_json_has_one_segment_per_30_s_window(server, pipe):
    wav = np.concatenate([sine(30.0, 300, seed=1), sine(30.0, 500, seed=2), sine(5.0, 700, seed=3)])
    t = server.client().audio.transcriptions.create(model=MODEL, file=("long.flac", wav_bytes(wav, "FLAC")),
                                                    language="en", response_format="verbose_json")
    assert t.language == "en" and t.duration == pytest.approx(65.0)
    assert [(s.id, s.start, s.end) for s in t.segments] == [(0, 0.0, 30.0), (1, 30.0, 60.0), (2, 60.0, 65.0)]
    # each segment is its own window transcribed alone, the text is theirs joined
    for seg, start in zip(t.segments, (0, 30, 60)):
        window = wav[start * 16000: (start + 30) * 16000]
        assert seg.text == pipe.transcribe(window, language="en", max_new_tokens=256)
        assert seg.avg_logprob <= 0 and len(seg.tokens) > 0
    assert t.text == " ".join(s.text for s in t.segments if s.text)


def test_chat_logprobs_in_openai_shape_streamed_and_not(server, pipe):
    client = server.client()
    messages = [{"role": "user", "content": [input_audio(wav_bytes(CLIP)), {"type": "text", "text": "What's that?"}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8  # finish_reason length: every token is shown
    assert b"".join(bytes(c.bytes) for c in content).decode(errors="replace") == r.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 3 and c.logprob <= 0
        # greedy: the chosen token is the most likely one, and the alternatives are a distribution's
        assert (c.top_logprobs[0].token, c.top_logprobs[0].logprob) == (c.token, c.logprob)
        assert sum(math.exp(t.logprob) for t in c.top_logprobs) <= 1 + 1e-5

    # the first token's log-probability is the model's own, computed here without the server
    prompt = pipe.processor.prepare_chats([messages_for_pipe(messages)])
    with torch.no_grad():
        logits = pipe.model(**prompt).logits[0, -1].float()
    top = logits.log_softmax(-1).topk(3)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert [bytes(t.bytes) for t in content[0].top_logprobs] == [pipe.tokenizer.token_bytes(i) for i in top.indices.tolist()]

    streamed = []
    for ch in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                             logprobs=True, top_logprobs=3, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            streamed += ch.choices[0].logprobs.content
    assert [(c.token, round(c.logprob, 5), [t.token for t in c.top_logprobs]) for c in streamed] == \
        [(c.token, round(c.logprob, 5), [t.token for t in c.top_logprobs]) for c in content]

    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content
    only = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0, logprobs=True)
    assert [c.top_logprobs for c in only.choices[0].logprobs.content] == [[], []]


def messages_for_pipe(messages):
    """The same conversation with the audio decoded, as the Python API takes it."""
    import base64

    part = messages[0]["content"][0]
    audio = {"type": "audio", "audio": base64.b64decode(part["input_audio"]["data"])}
    return [{"role": "user", "content": [audio, messages[0]["content"][1]]}]


def test_audio_url_must_be_an_object(server):
    client = server.client()
    url = "data:audio/wav;base64," + input_audio(wav_bytes(CLIP))["input_audio"]["data"]
    with pytest.raises(openai.BadRequestError, match="audio_url must be an object"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "audio_url", "audio_url": url}]}])
    ok = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
        {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}}]}])
    assert ok.usage.completion_tokens >= 1


def test_every_sampling_value_is_checked_before_the_engine():
    for bad in (dict(repetition_penalty=1e-300), dict(repetition_penalty=float("nan")), dict(temperature=float("inf")),
                dict(top_p=0.0), dict(top_k=-1), dict(top_k=2.5), dict(seed=2**64), dict(max_new_tokens=0),
                dict(stop=[""]), dict(logprobs=-1), dict(logprobs=21)):
        with pytest.raises(qwen2audio.errors.Qwen2AudioError):
            SamplingParams(**bad)
    assert SamplingParams(temperature=1e-40).greedy  # would overflow logits / T: treated as greedy
