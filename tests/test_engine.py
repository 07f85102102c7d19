"""Generation: cached == uncached, batch == one-by-one, sampling controls, stops, streaming, long audio."""

import numpy as np
import pytest
import torch
from tiny import run_until_idle, sine

import qwen2audio
from qwen2audio.chat import raw_prompt
from qwen2audio.engine import SamplingParams, generate_steps, prepare_chat
from qwen2audio.engine.sampling import Sampler, apply_repetition_penalty, choose_tokens
from qwen2audio.engine.scheduler import PromptTooLong


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False)


def analysis(audio, text="What's that sound?"):
    return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": text}]}]


def steps_of(pipe, conversations, params, ignore_eos=True):
    """The engine's per-step tokens for a batch of conversations (by default with no stop ids at all)."""
    prompts = [prepare_chat(pipe.tokenizer, c) for c in conversations]
    return list(generate_steps(pipe.engine(prompts, params), prompts, params, ignore_eos=ignore_eos))


def tokens_of(pipe, conversations, n, **kw):
    return [s.tokens for s in steps_of(pipe, conversations, SamplingParams(max_new_tokens=n, **kw))]


def test_cached_decoding_equals_uncached(pipe):
    """The engine's greedy tokens (paged KV cache) equal a full forward over the whole sequence at every step."""
    cached = [t[0] for t in tokens_of(pipe, [analysis(sine(2.0))], 24)]
    inputs = pipe.processor.prepare_chats([analysis(sine(2.0))])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    uncached = []
    with torch.no_grad():
        for _ in range(24):  # full forward over the whole sequence every step, no cache
            logits = pipe.model(input_ids=ids, attention_mask=mask, input_features=inputs["input_features"],
                                feature_attention_mask=inputs["feature_attention_mask"]).logits
            nxt = int(logits[0, -1].argmax())
            uncached.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
    assert cached == uncached


def test_batch_equals_one_by_one(pipe):
    conversations = [
        analysis(sine(1.0, 300, seed=1)),
        analysis(sine(6.0, 800, seed=2), "Describe it in detail, please."),
        [{"role": "user", "content": "hello world"}],
        [{"role": "user", "content": [{"type": "audio", "audio": sine(3.0, seed=3)}, {"type": "audio", "audio": sine(0.5, seed=4)}]}],
    ]
    together = pipe.chat_batch(conversations, max_new_tokens=20)
    alone = [pipe.chat(c, max_new_tokens=20) for c in conversations]
    assert together == alone
    assert len(set(together)) > 1  # the rows really differ


def test_stream_equals_chat(pipe):
    messages = analysis(sine(2.5, seed=7))
    pieces = list(pipe.stream(messages, max_new_tokens=30))
    assert "".join(pieces) == pipe.chat(messages, max_new_tokens=30)
    assert len(pieces) > 1


def test_stop_string_cuts_the_answer(pipe):
    messages = analysis(sine(2.5, seed=7))
    full = pipe.chat(messages, max_new_tokens=30)
    stop = full[5:8]
    assert stop and stop in full
    cut = pipe.chat(messages, max_new_tokens=30, stop=[stop])
    assert cut == full[: full.find(stop)]
    assert "".join(pipe.stream(messages, max_new_tokens=30, stop=[stop])) == cut


def test_stop_token_ends_generation(pipe):
    conversation = analysis(sine(2.0))
    free = [t[0] for t in tokens_of(pipe, [conversation], 12)]
    stop_at = free[4]
    steps = steps_of(pipe, [conversation], SamplingParams(max_new_tokens=12, stop_token_ids=[stop_at]), False)
    assert [s.tokens[0] for s in steps[:-1]] == free[: free.index(stop_at)]
    assert steps[-1].tokens[0] is None and steps[-1].finished[0]
    assert not any(s.finished[0] for s in steps[:-1])


def test_generate_steps_rows_finish_on_their_own(pipe):
    """Rows of one call end apart: a row that stopped yields None and stays finished while the others go on, each
    with the tokens it gets alone; the step a row reaches max_new_tokens is its last, and finished."""
    a, b = analysis(sine(1.0, 300, seed=1)), [{"role": "user", "content": "hello world"}]
    alone = [t[0] for t in tokens_of(pipe, [b], 10)]
    stop_at = alone[3]
    first = alone.index(stop_at)
    params = SamplingParams(max_new_tokens=10, stop_token_ids=[stop_at])
    steps = steps_of(pipe, [a, b], params, ignore_eos=False)
    assert [s.tokens[1] for s in steps[:first]] == alone[:first]
    assert all(s.tokens[1] is None and s.finished[1] for s in steps[first:])
    own = [t[0] for t in (s.tokens for s in steps_of(pipe, [a], params, ignore_eos=False))]
    assert [s.tokens[0] for s in steps] == own
    assert steps[-1].finished == [True, True] and not steps[-2].finished[0]


def test_closing_generate_steps_early_cancels_its_rows(pipe):
    prompts = [prepare_chat(pipe.tokenizer, analysis(sine(1.0)))]
    params = SamplingParams(max_new_tokens=20)
    engine = pipe.engine(prompts, params)
    cancelled = engine.counters["finished_cancelled"]
    steps = generate_steps(engine, prompts, params)
    next(steps)
    steps.close()
    run_until_idle(engine)
    assert engine.counters["finished_cancelled"] == cancelled + 1 and not engine.scheduler.running


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(pipe):
    messages = analysis(sine(2.0))
    kw = dict(max_new_tokens=20, temperature=1.5, top_p=0.95, top_k=50, seed=123)
    a, b = pipe.chat(messages, **kw), pipe.chat(messages, **kw)
    assert a == b
    others = {pipe.chat(messages, **{**kw, "seed": s}) for s in range(4)}
    assert len(others) > 1


def test_top_k_one_is_greedy():
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0, top_k=1)
    assert torch.equal(choose_tokens(logits, params, torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.8)
    g = torch.Generator().manual_seed(0)
    picks = {int(choose_tokens(logits, params, g)) for _ in range(200)}
    assert picks == {0, 1}


def test_repetition_penalty_matches_reference_rule():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(2, 30)
    ids = torch.tensor([[1, 5, 5, 7], [0, 2, 29, 3]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter(1, ids, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expected)


MIXED = [  # one batch, every row its own options
    SamplingParams(),
    SamplingParams(temperature=1.2, top_p=0.9, seed=3),
    SamplingParams(temperature=0.7, top_k=5, seed=4),
    SamplingParams(temperature=1.0, top_k=1, seed=5),
    SamplingParams(repetition_penalty=1.4),
    SamplingParams(temperature=1.5, top_p=0.5, top_k=20, repetition_penalty=1.2, seed=6),
]


def sampled_alone_and_together(steps=6, V=300):
    """Each row's tokens over `steps` steps: sampled in one batch of all rows, and each row in a sampler alone."""
    gen = torch.Generator().manual_seed(0)
    logits = [torch.randn(len(MIXED), V, generator=gen) * 3 for _ in range(steps)]
    prompts = [torch.randint(0, V, (7,), generator=gen) for _ in MIXED]
    together = Sampler(len(MIXED), V, "cpu")
    for row, (p, ids) in enumerate(zip(MIXED, prompts)):
        together.add(row, p, ids)
    batched = torch.stack([together.sample(step)[0] for step in logits], 1)  # (rows, steps)
    alone = []
    for row, (p, ids) in enumerate(zip(MIXED, prompts)):
        single = Sampler(1, V, "cpu")
        single.add(0, p, ids)
        alone.append(torch.cat([single.sample(step[row: row + 1])[0] for step in logits]))
    return batched, torch.stack(alone), logits


def test_batched_sampler_rows_equal_each_row_alone():
    """Seeded rows draw only from their own generator, so a row samples the same alone or in any batch, and
    greedy, top-k=1 and penalty rows stay exact argmaxes next to sampled ones."""
    batched, alone, logits = sampled_alone_and_together()
    assert torch.equal(batched, alone)
    assert torch.equal(batched[0], torch.stack([step[0].argmax() for step in logits]))
    assert torch.equal(batched[3], torch.stack([step[3].argmax() for step in logits]))  # top_k=1
    assert not torch.equal(batched[1], torch.stack([step[1].argmax() for step in logits]))  # really sampled
    again, _, _ = sampled_alone_and_together()
    assert torch.equal(batched[[1, 2, 3, 5]], again[[1, 2, 3, 5]])  # seeded rows are reproducible


def test_sampler_applies_each_rows_penalty_and_top_k():
    V = 50
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    top = logits.argmax(-1)
    sampler = Sampler(3, V, "cpu")
    sampler.add(0, SamplingParams(repetition_penalty=100.0), [int(top[0])])  # its best token was in the prompt
    sampler.add(1, SamplingParams(), [int(top[1])])  # no penalty: the same prompt id changes nothing
    sampler.add(2, SamplingParams(temperature=1.0, top_k=3, seed=0), [])
    picks = set()
    for _ in range(40):
        tokens, ok = sampler.sample(logits)
        assert int(tokens[1]) == int(top[1]) and bool(ok.all())
        picks.add(int(tokens[2]))
        sampler.seen[0] = False  # keep row 0's seen set to the prompt only
        sampler.seen[0, top[0]] = True
    assert int(tokens[0]) != int(top[0])
    assert picks <= set(logits[2].topk(3).indices.tolist()) and len(picks) > 1


def test_a_row_with_nan_probabilities_fails_alone():
    V = 40
    logits = torch.randn(3, V)
    logits[1, 5] = float("nan")
    sampler = Sampler(3, V, "cpu")
    for row in range(3):
        sampler.add(row, SamplingParams(temperature=1.0, seed=row), [])
    tokens, ok = sampler.sample(logits)
    assert ok.tolist() == [True, False, True]
    alone = Sampler(1, V, "cpu")
    alone.add(0, SamplingParams(temperature=1.0, seed=2), [])
    assert int(tokens[2]) == int(alone.sample(logits[2:])[0][0])


def test_seeded_batch_rows_equal_one_by_one(pipe):
    conversations = [analysis(sine(1.0, 300, seed=1)), analysis(sine(2.0, 500, seed=2), "Describe it.")]
    kw = dict(max_new_tokens=12, temperature=1.3, top_p=0.9, top_k=40, seed=11)
    assert pipe.chat_batch(conversations, **kw) == [pipe.chat(c, **kw) for c in conversations]


def test_invalid_sampling_params_are_rejected():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0), dict(top_k=-2), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_75s_clip_gives_three_audio_blocks(pipe):
    proc = pipe.processor
    clip = sine(75.0, 500, seed=9)
    inputs = proc([raw_prompt("Generate the caption in English:")], audio=[clip])
    tok = proc.tokenizer
    ids = inputs["input_ids"][0].tolist()
    assert inputs["input_features"].shape[0] == 3
    assert ids.count(tok.audio_bos_id) == 3 and ids.count(tok.audio_eos_id) == 3
    assert ids.count(tok.audio_id) == 750 + 750 + 375  # 30 s + 30 s + 15 s
    # the reference's behaviour on request: one window, 750 tokens
    cut = proc([raw_prompt("Generate the caption in English:")], audio=[clip], truncate=True)
    assert cut["input_features"].shape[0] == 1 and cut["input_ids"][0].tolist().count(tok.audio_id) == 750
    # and the model consumes all three blocks
    answer = pipe.chat(analysis(clip), max_new_tokens=4)
    assert isinstance(answer, str)


def test_placeholder_count_mismatch_is_an_error(pipe):
    with pytest.raises(ValueError, match="2 <\\|AUDIO\\|> placeholder"):
        pipe.processor([raw_prompt("x", 2)], audio=[sine(1.0)])
    with pytest.raises(qwen2audio.model.qwen2_audio.AudioTokenMismatch):
        pipe.model.embed(torch.tensor([[pipe.model.config.audio_token_index] * 3]), [torch.zeros(2, 64)])


def test_prompt_longer_than_positions_is_rejected(pipe):
    prompts = [prepare_chat(pipe.tokenizer, analysis(sine(1.0)))]
    params = SamplingParams(max_new_tokens=5000)
    with pytest.raises(PromptTooLong, match="exceeds the model's"):
        list(generate_steps(pipe.engine(), prompts, params))
    with pytest.raises(ValueError, match="exceeds the model's"):  # PromptTooLong is a ValueError
        pipe.chat(analysis(sine(1.0)), max_new_tokens=5000)


def test_audio_parts_in_every_shape(pipe, tmp_path):
    import base64
    import io

    import soundfile as sf

    clip = sine(1.5, seed=11)
    path = tmp_path / "clip.wav"
    sf.write(path, clip, 16000, subtype="FLOAT")
    buf = io.BytesIO()
    sf.write(buf, clip, 16000, format="WAV", subtype="FLOAT")
    b64 = base64.b64encode(buf.getvalue()).decode()
    parts = [
        {"type": "audio", "audio": str(path)},
        {"type": "audio", "audio": path.read_bytes()},
        {"type": "audio", "audio": clip},
        {"type": "audio", "audio": (clip, 16000)},
        {"type": "audio", "audio_url": f"file://{path}"},
        {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{b64}"}},
        {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
    ]
    answers = {pipe.chat([{"role": "user", "content": [p]}], max_new_tokens=6) for p in parts}
    assert len(answers) == 1


def test_remote_urls_are_not_fetched(pipe):
    with pytest.raises(qwen2audio.chat.MessageError, match="not fetched"):
        pipe.chat([{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "https://example.com/a.wav"}}]}])


def test_bad_audio_names_the_input(pipe):
    with pytest.raises(qwen2audio.AudioError, match="too short"):
        pipe.chat(analysis(np.zeros(100, np.float32)))


def test_answer_keeps_an_incomplete_trailing_character(pipe):
    """chat() returns exactly tokenizer.decode(generated ids), even when they end mid-character."""
    tok = pipe.tokenizer
    for seed in range(6):
        messages = analysis(sine(1.0 + seed / 3, 200 + 100 * seed, seed=seed))
        ids = [t[0] for t in tokens_of(pipe, [messages], 15)]
        ids = ids[: next((i for i, t in enumerate(ids) if t in pipe.stop_ids), len(ids))]
        assert pipe.chat(messages, max_new_tokens=15) == tok.decode(ids)
        assert "".join(pipe.stream(messages, max_new_tokens=15)) == tok.decode(ids)
