"""Continuous-batching engine: mid-flight admission == alone, per-row sampling, slots freed on finish
and on cancel, encoded-audio cache, queue and context limits. The engine is stepped by hand."""

import pytest
from tiny import run_until_idle, sine

import qwen2audio
from qwen2audio.engine import SamplingParams
from qwen2audio.engine.inputs import prepare_chat, prepare_prompt
from qwen2audio.engine.llm_engine import LLMEngine, collect, iter_outputs
from qwen2audio.engine.scheduler import PromptTooLong, QueueFull


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False)


def engine_for(pipe, **kw) -> LLMEngine:
    return LLMEngine(pipe.model, pipe.tokenizer, pipe.stop_ids, **kw)


def conv(i: int, text="What's that sound?"):
    return [{"role": "user", "content": [{"type": "audio", "audio": sine(0.8 + 0.6 * i, 200 + 90 * i, seed=i)},
                                         {"type": "text", "text": text}]}]


def result(seq):
    text, last = collect(iter_outputs(seq, timeout=0))
    return text, last


def test_prompt_inputs_equal_the_processor(pipe):
    for messages in (conv(1), [{"role": "user", "content": "hello world"}],
                     [{"role": "user", "content": [{"type": "audio", "audio": sine(65.0, seed=3)},
                                                   {"type": "audio", "audio": sine(2.0, seed=4)}]}]):
        ours = prepare_chat(pipe.tokenizer, messages)
        ref = pipe.processor.prepare_chats([messages])
        assert ours.ids == ref["input_ids"][0].tolist()
        assert len(ours.windows) == (0 if "input_features" not in ref else ref["input_features"].shape[0])
    assert len(prepare_chat(pipe.tokenizer, conv(0)).keys) == 1


def test_requests_admitted_mid_flight_match_alone(pipe):
    convs = [conv(i) for i in range(6)] + [[{"role": "user", "content": "hello world"}]]
    budgets = [6 + 4 * i for i in range(len(convs))]  # different lengths: rows leave at different steps
    alone = [pipe.chat(c, max_new_tokens=n) for c, n in zip(convs, budgets)]
    engine = engine_for(pipe, max_batch=3)  # fewer slots than requests: some wait, rows get reused and moved
    seqs = [engine.submit(prepare_chat(pipe.tokenizer, c), SamplingParams(max_new_tokens=n))
            for c, n in zip(convs[:2], budgets[:2])]
    for _ in range(3):
        engine.step()
    assert len(engine.scheduler.running) == 2 and all(s.pos > s.prompt_len for s in seqs)
    seqs += [engine.submit(prepare_chat(pipe.tokenizer, c), SamplingParams(max_new_tokens=n))
             for c, n in zip(convs[2:], budgets[2:])]
    engine.step()
    assert len(engine.scheduler.running) == 3 and engine.scheduler.queue_depth == 4
    run_until_idle(engine)
    outputs = [result(s) for s in seqs]
    assert [text for text, _ in outputs] == alone
    assert len(set(alone)) == len(alone)  # the rows really differ
    assert [last.completion_tokens for _, last in outputs] == budgets
    assert all(last.finish_reason == "length" for _, last in outputs)
    assert engine.scheduler.free_slots == 3


def test_per_row_sampling_parameters(pipe):
    messages = conv(2)
    greedy = pipe.chat(messages, max_new_tokens=20)
    stop = greedy[4:7]
    assert stop and stop in greedy
    cases = {
        "greedy": dict(max_new_tokens=20),
        "seeded": dict(max_new_tokens=20, temperature=1.5, top_p=0.95, top_k=50, seed=123),
        "other_seed": dict(max_new_tokens=20, temperature=1.5, top_p=0.95, top_k=50, seed=7),
        "top_k_one": dict(max_new_tokens=20, temperature=1.0, top_k=1, seed=1),
        "stop": dict(max_new_tokens=20, stop=[stop]),
        "short": dict(max_new_tokens=3),
        "penalty": dict(max_new_tokens=20, repetition_penalty=1.5),
    }
    engine = engine_for(pipe, max_batch=len(cases))
    prompt = prepare_chat(pipe.tokenizer, messages)
    seqs = {k: engine.submit(prompt, SamplingParams(**kw)) for k, kw in cases.items()}
    run_until_idle(engine)
    got = {k: result(s) for k, s in seqs.items()}
    for k, kw in cases.items():  # every row equals the same request run alone by the static generate loop
        assert got[k][0] == pipe.chat(messages, **kw), k
    assert got["greedy"][0] == greedy and got["top_k_one"][0] == greedy
    assert got["seeded"][0] != greedy and got["seeded"][0] != got["other_seed"][0]
    assert got["stop"][0] == greedy[: greedy.find(stop)] and got["stop"][1].finish_reason == "stop"
    assert got["short"][1].completion_tokens == 3 and got["short"][1].finish_reason == "length"
    assert got["penalty"][0] != greedy


def test_a_failing_row_does_not_take_the_batch_down(pipe):
    engine = engine_for(pipe, max_batch=2)
    prompt = prepare_chat(pipe.tokenizer, conv(4))
    good = engine.submit(prompt, SamplingParams(max_new_tokens=10))
    # SamplingParams refuses values that overflow; set one behind its back to reach the engine's own guard
    broken = SamplingParams(max_new_tokens=10, temperature=1.0)
    broken.repetition_penalty = 1e-300  # logits / 1e-300 = inf -> NaN probabilities
    bad = engine.submit(prompt, broken)
    run_until_idle(engine)
    _, last = result(bad)
    assert last.finish_reason == "error" and "sampling failed" in last.error
    assert result(good)[0] == pipe.chat(conv(4), max_new_tokens=10)
    assert engine.scheduler.free_slots == 2


def test_stop_token_ids_and_ignore_eos(pipe):
    prompt = prepare_chat(pipe.tokenizer, conv(3))
    engine = engine_for(pipe, max_batch=2)
    free = engine.submit(prompt, SamplingParams(max_new_tokens=12))
    run_until_idle(engine)
    ids = [t for out in iter_outputs(free, timeout=0) for t in out.token_ids]
    stop_at = ids[4]
    first = ids.index(stop_at)
    stopped = engine.submit(prompt, SamplingParams(max_new_tokens=12, stop_token_ids=[stop_at]))
    ignored = engine.submit(prompt, SamplingParams(max_new_tokens=12, stop_token_ids=[stop_at]), ignore_eos=True)
    run_until_idle(engine)
    text, last = result(stopped)
    assert last.finish_reason == "stop" and last.completion_tokens == first + 1  # the stop id counts, unshown
    assert text == pipe.tokenizer.decode(ids[:first])
    _, last = result(ignored)
    assert last.finish_reason == "length" and last.completion_tokens == 12


def test_slots_are_freed_on_finish_and_on_cancel(pipe):
    engine = engine_for(pipe, max_batch=2)
    convs = [conv(i) for i in range(4)]
    long = [engine.submit(prepare_chat(pipe.tokenizer, c), SamplingParams(max_new_tokens=120)) for c in convs[:3]]
    short = engine.submit(prepare_chat(pipe.tokenizer, convs[3]), SamplingParams(max_new_tokens=30))
    engine.step()
    assert engine.scheduler.free_slots == 0 and engine.scheduler.queue_depth == 2
    # cancelling a waiting request drops it without a prefill; cancelling a running one frees its row
    prefills = engine.counters["prefills"]
    engine.cancel(long[2])
    engine.cancel(long[0])
    engine.step()
    assert result(long[0])[1].finish_reason == "cancelled" and result(long[2])[1].finish_reason == "cancelled"
    assert engine.counters["prefills"] == prefills + 1  # only `short` took the freed row
    # nothing moves: long[1] keeps its row and blocks, `short` takes the row long[0] left
    assert long[1].row == 1 and short.row == 0
    assert engine.scheduler.free_slots == 0 and engine.scheduler.queue_depth == 0
    run_until_idle(engine)
    assert engine.scheduler.free_slots == 2 and not engine.scheduler.running
    assert result(short)[0] == pipe.chat(convs[3], max_new_tokens=30)
    assert result(long[1])[0] == pipe.chat(convs[1], max_new_tokens=120)
    assert engine.counters["finished_cancelled"] == 2 and engine.counters["finished_length"] == 2


def test_encoded_audio_cache_serves_repeated_clips(pipe):
    engine = engine_for(pipe, max_batch=2)
    clip = sine(3.0, 330, seed=5)
    turn1 = [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": "What's that sound?"}]}]
    seq = engine.submit(prepare_chat(pipe.tokenizer, turn1), SamplingParams(max_new_tokens=8))
    run_until_idle(engine)
    answer = result(seq)[0]
    assert engine.audio_cache.misses == 1 and engine.audio_cache.hits == 0
    turn2 = turn1 + [{"role": "assistant", "content": answer},
                     {"role": "user", "content": [{"type": "audio", "audio": clip.copy()},
                                                  {"type": "text", "text": "Describe it in detail, please."}]}]
    seq = engine.submit(prepare_chat(pipe.tokenizer, turn2), SamplingParams(max_new_tokens=8))
    run_until_idle(engine)
    # turn 1's clip sits in blocks the prefix cache serves (no encoding needed at all); turn 2's copy of it is new
    # to the KV cache but not to the audio cache
    assert engine.audio_cache.hits == 1 and engine.counters["audio_windows_encoded"] == 1
    assert engine.counters["prompt_tokens_cached"] > 0
    assert result(seq)[0] == pipe.chat(turn2, max_new_tokens=8)


def test_queue_and_context_limits(pipe):
    engine = engine_for(pipe, max_batch=1, max_queue=1, max_model_len=256)
    prompt = prepare_chat(pipe.tokenizer, conv(0))
    engine.submit(prompt, SamplingParams(max_new_tokens=4))
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit(prompt, SamplingParams(max_new_tokens=4))
    with pytest.raises(PromptTooLong, match="at most"):
        engine.submit(prompt, SamplingParams(max_new_tokens=256))
    long_audio = prepare_prompt(pipe.tokenizer, "<|audio_bos|><|AUDIO|><|audio_eos|>x", [sine(12.0)])
    with pytest.raises(PromptTooLong, match="context limit"):
        engine.submit(long_audio, SamplingParams(max_new_tokens=1))
    with pytest.raises(ValueError, match="holds no request"):
        engine_for(pipe, max_batch=4, kv_cache_bytes=1000)


def test_engine_thread_serves_concurrent_submitters(pipe):
    import threading

    engine = engine_for(pipe, max_batch=4).start()
    try:
        convs = [conv(i, "Describe it.") for i in range(8)]
        expected = [pipe.chat(c, max_new_tokens=10) for c in convs]
        got = [None] * len(convs)

        def worker(i):
            seq = engine.submit(prepare_chat(pipe.tokenizer, convs[i]), SamplingParams(max_new_tokens=10))
            got[i] = collect(iter_outputs(seq, timeout=60))[0]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(convs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert got == expected
    finally:
        engine.shutdown()


def test_requests_admitted_together_are_prefilled_in_one_batch(pipe, monkeypatch):
    """Right-padded prompts of different lengths, one batch: each answers as it does alone."""
    convs = [conv(i) for i in range(4)] + [[{"role": "user", "content": "hello world"}]]
    alone = [pipe.chat(c, max_new_tokens=10) for c in convs]
    engine = engine_for(pipe, max_batch=8, batch_prefill=True)  # the default on CUDA only
    batches, real = [], engine.runner.prefill
    monkeypatch.setattr(engine.runner, "prefill", lambda seqs: batches.append(len(seqs)) or real(seqs))
    seqs = [engine.submit(prepare_chat(pipe.tokenizer, c), SamplingParams(max_new_tokens=10)) for c in convs]
    run_until_idle(engine)
    assert batches == [5]  # different prompt lengths: one right-padded batch
    assert [result(s)[0] for s in seqs] == alone


def test_a_request_failing_in_a_batched_prefill_fails_alone(pipe, monkeypatch):
    convs = [conv(i) for i in range(3)]
    alone = [pipe.chat(c, max_new_tokens=8) for c in convs]
    engine = engine_for(pipe, max_batch=4, batch_prefill=True)
    prompts = [prepare_chat(pipe.tokenizer, c) for c in convs]
    batches, real_prefill, real_encode = [], engine.runner.prefill, engine.runner.encode

    def encode(prompt, *which):
        if prompt is prompts[1]:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_encode(prompt, *which)

    monkeypatch.setattr(engine.runner, "encode", encode)
    monkeypatch.setattr(engine.runner, "prefill", lambda seqs: batches.append(len(seqs)) or real_prefill(seqs))
    seqs = [engine.submit(p, SamplingParams(max_new_tokens=8)) for p in prompts]
    run_until_idle(engine)
    outputs = [result(s) for s in seqs]
    assert batches == [3, 1, 1, 1]  # the batch failed, then each request alone
    assert outputs[1][1].finish_reason == "error" and "out of memory" in outputs[1][1].error
    assert [outputs[0][0], outputs[2][0]] == [alone[0], alone[2]]
    assert engine.counters["prefills"] == 2 and engine.scheduler.free_slots == 4
