"""The paged KV cache: block bookkeeping and prefix hashing, prefix-cache hits == cold prefills, admission under
the block budget, preemption (recompute) and chunked prefill mixed with decode steps. The engine is stepped by
hand on the tiny model (fp32, greedy unless said)."""

import pytest
from tiny import run_until_idle, sine

import qwen2audio
from qwen2audio.engine import SamplingParams
from qwen2audio.engine.block_manager import BlockManager, audio_runs, hashes_of
from qwen2audio.engine.inputs import prepare_chat
from qwen2audio.engine.llm_engine import LLMEngine, collect, iter_outputs


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False)


def engine_for(pipe, **kw) -> LLMEngine:
    return LLMEngine(pipe.model, pipe.tokenizer, pipe.stop_ids, **kw)


def text_of(seq):
    """The whole answer (read from its output queue once, then kept)."""
    if not hasattr(seq, "text"):
        seq.text = collect(iter_outputs(seq, timeout=0))[0]
    return seq.text


def ask(clip, text="What's that sound?"):
    return {"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": text}]}


# ---- bookkeeping, no model ---------------------------------------------------------------------
def test_blocks_are_shared_counted_and_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=6, block_size=4)
    ids = list(range(10))
    hashes = hashes_of(ids, [], 4, 0, 2, None)
    a = bm.allocate([], 10)  # 3 blocks, two of them full
    bm.register(a, hashes, 0)
    assert bm.cached_prefix(hashes) == a[:2] and bm.num_free == 3
    b = bm.allocate(bm.cached_prefix(hashes), 10)  # shares the two full blocks, gets its own tail
    assert b[:2] == a[:2] and b[2] != a[2] and bm.num_free == 2
    assert [bm.blocks[i].ref_count for i in a[:2]] == [2, 2]
    b_held = list(b)
    bm.release(a)  # empties the table it is given
    assert a == [] and bm.num_free == 3 and bm.cached_prefix(hashes) == b[:2]  # still held by b
    bm.release(b)
    b = b_held
    assert bm.num_free == 6 and bm.cached_prefix(hashes) == b[:2]  # free, but still findable
    # blocks without a hash go first; then the cached ones, least recently freed first (the prompt's tail block)
    taken = [bm._take_free() for _ in range(5)]
    assert set(taken[:4]).isdisjoint(b[:2]) and taken[4] == b[1]
    assert bm.cached_prefix(hashes) == [b[0]]  # evicting block 1 left block 0 findable
    assert not bm.grow(taken, 4 * 8)  # more than the free blocks: the table stays as it was
    assert len(taken) == 5


def test_a_blocks_hash_covers_its_audio_and_everything_before_it():
    ids = [1, 2, 7, 7, 7, 7, 3, 4]  # 7: the audio placeholder
    runs_a, runs_b = [(2, 6, b"clip-a")], [(2, 6, b"clip-b")]
    ha, hb = hashes_of(ids, runs_a, 4, 0, 2, None), hashes_of(ids, runs_b, 4, 0, 2, None)
    assert ha[0] != hb[0] and ha[1] != hb[1]  # same ids, different clips
    assert hashes_of(ids, runs_a, 4, 0, 2, None) == ha  # deterministic
    other = [9] + ids[1:]
    assert hashes_of(other, runs_a, 4, 0, 2, None)[1] != ha[1]  # chains the earlier blocks
    assert hashes_of(ids, [], 4, 0, 1, None) == hashes_of([1, 2, 7, 7, 5, 5, 5, 5], [], 4, 0, 1, None)


def test_audio_runs_follow_the_processor(pipe):
    prompt = prepare_chat(pipe.tokenizer, [{"role": "user", "content": [
        {"type": "audio", "audio": sine(35.0, seed=1)}, {"type": "audio", "audio": sine(1.0, seed=2)}]}])
    runs = audio_runs(prompt.ids, pipe.model.config.audio_token_index, prompt.windows, prompt.keys)
    assert [z - a for a, z, _ in runs] == [750, 125, 25] and [k for _, _, k in runs] == prompt.keys
    assert all(prompt.ids[a - 1] == pipe.tokenizer.audio_bos_id and prompt.ids[z] == pipe.tokenizer.audio_eos_id
               for a, z, _ in runs)


# ---- the engine ----------------------------------------------------------------------------------
def test_prefix_cache_hit_equals_cold_prefill(pipe):
    """A multi-turn conversation re-sent with one more turn: the warm engine computes only the new blocks, and
    answers token for token as a cold engine that computes them all."""
    clip = sine(4.0, 350, seed=21)
    turn1 = [ask(clip)]
    warm = engine_for(pipe, max_batch=2)
    first = warm.submit(prepare_chat(pipe.tokenizer, turn1), SamplingParams(max_new_tokens=12))
    run_until_idle(warm)
    conversation = turn1 + [{"role": "assistant", "content": text_of(first)},
                            {"role": "user", "content": "Describe it in detail, please."}]
    for turn in range(2):
        prompt = prepare_chat(pipe.tokenizer, conversation)
        cold = engine_for(pipe, max_batch=2)
        expected = cold.submit(prompt, SamplingParams(max_new_tokens=16))
        run_until_idle(cold)
        assert cold.counters["prompt_tokens_cached"] == 0
        cached_before = warm.counters["prompt_tokens_cached"]
        got = warm.submit(prompt, SamplingParams(max_new_tokens=16))
        run_until_idle(warm)
        assert got.cached_tokens >= (len(prompt.ids) // 2) // 16 * 16 and got.cached_tokens % 16 == 0
        assert warm.counters["prompt_tokens_cached"] - cached_before == got.cached_tokens
        assert warm.counters["audio_windows_encoded"] == 1  # the clip's blocks came from the cache
        assert text_of(got) == text_of(expected) and got.output_ids == expected.output_ids
        conversation = conversation + [{"role": "assistant", "content": text_of(got)},
                                       {"role": "user", "content": "And what else?"}]
    assert pipe.chat(conversation[:-2], max_new_tokens=16) == text_of(got)  # and as the Python API answers


def test_a_different_clip_of_the_same_length_is_not_a_cache_hit(pipe):
    engine = engine_for(pipe, max_batch=2)
    a = engine.submit(prepare_chat(pipe.tokenizer, [ask(sine(3.0, 300, seed=1))]), SamplingParams(max_new_tokens=4))
    run_until_idle(engine)
    other = [ask(sine(3.0, 900, seed=2))]
    b = engine.submit(prepare_chat(pipe.tokenizer, other), SamplingParams(max_new_tokens=8))
    run_until_idle(engine)
    first_audio = min(start for start, _, _ in b.audio_runs)
    assert b.cached_tokens <= first_audio  # at most the text before the audio is shared
    assert a.prompt.ids == b.prompt.ids  # the ids alone would have matched
    assert text_of(b) == pipe.chat(other, max_new_tokens=8)


def test_admission_waits_for_blocks_and_preemption_recomputes_exactly(pipe):
    """Too few blocks for every request's whole answer: requests wait at admission, running ones are preempted
    when their next token has no block, and are recomputed later; every answer equals the request run alone."""
    convs = [[{"role": "user", "content": f"hello world {i}"}] for i in range(3)]
    prompts = [prepare_chat(pipe.tokenizer, c) for c in convs]
    kinds = [dict(), dict(temperature=1.2, top_p=0.9, seed=5), dict(repetition_penalty=1.3)]
    params = [SamplingParams(max_new_tokens=40, **k) for k in kinds]
    alone = []
    for p, sp in zip(prompts, params):
        e = engine_for(pipe, max_batch=4)
        s = e.submit(p, sp, ignore_eos=True)
        run_until_idle(e)
        alone.append(s.output_ids)
    blocks = -(-(len(prompts[0].ids) + 40) // 16) + 2  # one whole request, and little more
    engine = engine_for(pipe, max_batch=4, num_blocks=blocks, max_model_len=blocks * 16)
    seqs = [engine.submit(p, sp, ignore_eos=True) for p, sp in zip(prompts, params)]
    engine.step()
    assert len(engine.scheduler.running) < 3 and engine.scheduler.queue_depth >= 1  # not all admitted at once
    run_until_idle(engine)
    assert engine.counters["preemptions"] > 0
    assert [s.output_ids for s in seqs] == alone
    assert [len(s.output_ids) for s in seqs] == [40] * 3
    assert engine.blocks.num_free == blocks and engine.scheduler.free_slots == 4


def test_chunked_prefill_does_not_stall_decoding_requests(pipe):
    short_conv = [{"role": "user", "content": "hello world"}]
    long_conv = [ask(sine(12.0, 500, seed=8), "Describe it in detail, please.")]
    alone = engine_for(pipe, max_batch=1)
    short_alone = alone.submit(prepare_chat(pipe.tokenizer, short_conv), SamplingParams(max_new_tokens=30),
                               ignore_eos=True)
    run_until_idle(alone)
    engine = engine_for(pipe, max_batch=2, chunk_tokens=64)
    short = engine.submit(prepare_chat(pipe.tokenizer, short_conv), SamplingParams(max_new_tokens=30),
                          ignore_eos=True)
    engine.step()  # the short prompt alone: one piece
    assert short.prefilled and len(short.output_ids) == 1
    long_prompt = prepare_chat(pipe.tokenizer, long_conv)
    assert len(long_prompt.ids) > 4 * 64
    long = engine.submit(long_prompt, SamplingParams(max_new_tokens=8))
    chunks = 0
    while not long.prefilled:
        before = len(short.output_ids)
        engine.step()
        chunks += 1
        assert len(short.output_ids) == before + 1  # the running request got its token in every step
        assert long.num_computed <= long.cached_tokens + chunks * 64
    assert chunks == -(-(len(long_prompt.ids) - long.cached_tokens) // 64) > 4
    run_until_idle(engine)
    assert text_of(long) == pipe.chat(long_conv, max_new_tokens=8)
    assert short.output_ids == short_alone.output_ids


def test_the_pipeline_drops_its_caches_when_the_weights_change(tiny_checkpoint):
    """The Python API keeps its engine (and prefix cache) between calls, but not past a change of the weights:
    cached keys/values and audio encodings of the old weights would give wrong answers."""
    import torch

    own = qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False)
    messages = [ask(sine(2.0, 420, seed=3))]
    first = own.chat(messages, max_new_tokens=6)
    engine = own._engine
    assert own.chat(messages, max_new_tokens=6) == first
    assert own._engine is engine and engine.counters["prompt_tokens_cached"] > 0
    with torch.no_grad():
        own.model.language_model.model.norm.weight.mul_(1.5)  # in place, as an optimiser step does
    changed = own.chat(messages, max_new_tokens=6)
    assert own._engine is not engine and own._engine.counters["prompt_tokens_cached"] == 0
    assert changed == qwen2audio.api.Pipeline(own.model, own.processor, own.stop_ids).chat(messages, max_new_tokens=6)
