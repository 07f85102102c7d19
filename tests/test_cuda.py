"""The CUDA paths, on a GPU: parity with the reference, the engine, bf16, training and the default model.

CI has no GPU, so these are skipped there (the reason is printed); on a GPU machine run them with
`pytest -m cuda`. Every model here is the tiny random one of the other tests, except the default model.
"""

import contextlib
import copy
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from server_harness import MODEL, input_audio, start_server, wav_bytes
from tiny import sine

import qwen2audio
from qwen2audio.engine import SamplingParams, generate_steps
from qwen2audio.engine.inputs import prepare_chat, prepare_prompt
from qwen2audio.engine.llm_engine import LLMEngine, collect, iter_outputs
from qwen2audio.train.config import TrainConfig
from qwen2audio.train.loop import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]


def analysis(audio, text="What's that sound?"):
    return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": text}]}]


def engine_tokens(pipe, prompts, params):
    """Each step's tokens from the pipeline's engine, no stop ids (as transformers' min_new_tokens forces)."""
    return [s.tokens for s in generate_steps(pipe.engine(prompts, params), prompts, params, ignore_eos=True)]


CONVERSATIONS = [
    analysis(sine(1.0, 300, seed=1)),
    analysis(sine(6.0, 800, seed=2), "Describe it in detail, please."),
    [{"role": "user", "content": "hello world"}],
    [{"role": "user", "content": [{"type": "audio", "audio": sine(3.0, seed=3)}, {"type": "audio", "audio": sine(0.5, seed=4)}]}],
    analysis(sine(65.0, 500, seed=5)),  # three 30 s windows
]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return copy.deepcopy(tiny_checkpoint[1]).cuda().eval()


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return qwen2audio.load(tiny_checkpoint[0], device="cuda", dtype="float32", progress=False)


@pytest.fixture
def no_tf32():
    """Full fp32 matrix products and convolutions. With TF32 (cuDNN's default for convolutions) the two sides'
    differently shaped encoder inputs (ours cropped to the audio, the reference padded to 30 s) round apart by ~4e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_logits_match_reference_on_cuda(pipe, reference, tiny_checkpoint, no_tf32):
    from transformers import AutoProcessor

    texts = [pipe.processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in CONVERSATIONS[:4]]
    audio = [sine(1.0, 300, seed=1), sine(6.0, 800, seed=2), sine(3.0, seed=3), sine(0.5, seed=4)]
    ours = pipe.processor(texts, audio=audio)
    ref_proc = AutoProcessor.from_pretrained(tiny_checkpoint[0])
    r = ref_proc(text=texts, audio=audio, return_tensors="pt", padding=True, sampling_rate=16000)
    r = {k: v.cuda() for k, v in r.items()}
    positions = (r["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref_logits = reference(**r, position_ids=positions).logits
        our_logits = pipe.model(**{k: v.cuda() for k, v in ours.items()}, position_ids=positions).logits
    assert our_logits.device.type == "cuda"
    real = r["attention_mask"].bool()
    assert (ref_logits[real] - our_logits[real]).abs().max() <= 1e-4


def test_greedy_tokens_match_reference_and_cpu(pipe, reference, tiny_checkpoint):
    from transformers import AutoProcessor

    text = pipe.processor.apply_chat_template(CONVERSATIONS[0])
    clip = sine(1.0, 300, seed=1)
    ref_proc = AutoProcessor.from_pretrained(tiny_checkpoint[0])
    r = ref_proc(text=[text], audio=[clip], return_tensors="pt", padding=True, sampling_rate=16000)
    with torch.no_grad():
        out = reference.generate(**{k: v.cuda() for k, v in r.items()}, max_new_tokens=40, min_new_tokens=40,
                                 do_sample=False)
    ref_tokens = out[0, r["input_ids"].shape[1]:].tolist()
    prompts = [prepare_prompt(pipe.tokenizer, text, [clip])]
    params = SamplingParams(max_new_tokens=40)
    ours = [t[0] for t in engine_tokens(pipe, prompts, params)]
    assert ours == ref_tokens
    cpu = qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False)
    assert [t[0] for t in engine_tokens(cpu, prompts, params)] == ours


def test_batch_equals_one_by_one_on_cuda(pipe):
    together = pipe.chat_batch(CONVERSATIONS, max_new_tokens=20)
    assert together == [pipe.chat(c, max_new_tokens=20) for c in CONVERSATIONS]
    assert len(set(together)) > 1


@contextlib.contextmanager
def eager(model):
    saved, model.use_cuda_graphs = model.use_cuda_graphs, False
    try:
        yield
    finally:
        model.use_cuda_graphs = saved


def test_cuda_graph_decode_equals_eager_across_span_buckets(pipe, no_tf32):
    prompts = [prepare_chat(pipe.tokenizer, c) for c in (CONVERSATIONS[2], CONVERSATIONS[0])]  # two lengths
    params = SamplingParams(max_new_tokens=300)  # the keys outgrow the first 256-key graph
    # One engine for both runs; without prefix caching the second run computes its prompts again.
    engine = LLMEngine(pipe.model, pipe.tokenizer, pipe.stop_ids, max_batch=2, prefix_caching=False)
    assert engine.graphs is not None
    with eager(pipe.model):
        expected = [s.tokens for s in generate_steps(engine, prompts, params, ignore_eos=True)]
    assert engine.graphs.replays == 0
    graphed = [s.tokens for s in generate_steps(engine, prompts, params, ignore_eos=True)]
    assert {(2, 256), (2, 512)} <= set(engine.graphs.graphs)  # (rows, keys) buckets
    assert engine.graphs.replays >= 299 and graphed == expected


def test_the_pipelines_engine_is_kept_and_its_graphs_equal_eager(pipe):
    pipe.chat(CONVERSATIONS[0], max_new_tokens=2)
    engine = pipe._engine  # the Python API's engine, kept between calls (its KV cache and graphs with it)
    assert engine.graphs is not None
    with eager(pipe.model):
        expected = pipe.chat_batch([CONVERSATIONS[0]] * 8, max_new_tokens=12)
    replays = engine.graphs.replays
    assert pipe.chat_batch([CONVERSATIONS[0]] * 8, max_new_tokens=12) == expected
    assert pipe._engine is engine and engine.graphs.replays > replays


def test_graphs_are_recaptured_after_the_weights_are_replaced(tiny_checkpoint):
    own = qwen2audio.load(tiny_checkpoint[0], device="cuda", dtype="float32", progress=False)
    own.chat(CONVERSATIONS[0], max_new_tokens=4)
    before = own._engine
    own.model.to("cpu").to("cuda")  # new parameter tensors: the old graphs (and caches) would read freed ones
    with eager(own.model):
        expected = own.chat(CONVERSATIONS[0], max_new_tokens=20)
    assert own.chat(CONVERSATIONS[0], max_new_tokens=20) == expected
    assert own._engine is not before and own._engine.graphs.replays > 0


def test_continuous_batching_engine_on_cuda(pipe):
    """Rows admitted mid-flight into the GPU KV cache, decoded by CUDA graphs, answer as they would alone."""
    budgets = [6 + 4 * i for i in range(len(CONVERSATIONS))]
    with eager(pipe.model):
        alone = [pipe.chat(c, max_new_tokens=n) for c, n in zip(CONVERSATIONS, budgets)]
    engine = LLMEngine(pipe.model, pipe.tokenizer, pipe.stop_ids, max_batch=3)
    assert engine.graphs is not None
    seqs = [engine.submit(prepare_chat(pipe.tokenizer, c), SamplingParams(max_new_tokens=n))
            for c, n in zip(CONVERSATIONS, budgets)]
    for _ in range(10_000):
        if not engine.scheduler.has_work():
            break
        engine.step()
    assert [collect(iter_outputs(s, timeout=0))[0] for s in seqs] == alone
    assert engine.graphs.replays == engine.counters["decode_steps"] > 0


def test_concurrent_http_requests_on_cuda(tiny_checkpoint, pipe):
    """The server's engine thread on the GPU: 16 requests at once, each answered as it is alone."""
    convs = [[{"role": "user", "content": [input_audio(wav_bytes(sine(0.6 + 0.3 * i, 150 + 37 * i, seed=i))),
                                           {"type": "text", "text": "What's that sound?"}]}] for i in range(16)]
    budgets = [4 + (i * 7) % 20 for i in range(16)]
    with eager(pipe.model):
        expected = [pipe.chat(c, max_new_tokens=n) for c, n in zip(convs, budgets)]
    server = start_server(tiny_checkpoint[0], device="cuda")
    try:
        def ask(i):
            body = {"model": MODEL, "messages": convs[i], "max_tokens": budgets[i], "temperature": 0}
            r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(ask, range(16)))
        assert got == expected
        assert server.engine.graphs.replays > 0 and server.engine.counters["peak_running"] > 1
    finally:
        server.close()


def test_bf16_tracks_fp32_on_cuda(tiny_checkpoint, pipe):
    half = qwen2audio.load(tiny_checkpoint[0], device="cuda", dtype="bfloat16", progress=False)
    assert half.model.dtype == torch.bfloat16
    inputs = {k: v.cuda() for k, v in pipe.processor([pipe.processor.apply_chat_template(CONVERSATIONS[1])],
                                                     audio=[sine(6.0, 800, seed=2)]).items()}
    with torch.no_grad():
        full = pipe.model(**inputs).logits.float()
        low = half.model(**inputs).logits.float()
    assert torch.isfinite(low).all()
    cosine = torch.nn.functional.cosine_similarity(full.flatten(1), low.flatten(1)).min()
    assert cosine > 0.99, float(cosine)


def test_default_model_in_bf16_on_cuda():
    from test_default_model_e2e import MISSING

    from qwen2audio.bundle.examples import EXAMPLES, messages

    if MISSING:
        pytest.skip(f"the default model's part packages are not installed ({MISSING})")
    pipe = qwen2audio.load(device="cuda", dtype="bfloat16", progress=False)
    assert "Paris" in pipe.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16)
    for example in EXAMPLES:
        assert pipe.chat(messages(example), max_new_tokens=32).strip(), example["audio"]


# ---- training --------------------------------------------------------------------------------
LABELS = {"low.wav": "a low hum", "high.wav": "a high beep", "mid.wav": "a middle tone"}


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("cuda_train")
    for (name, label), freq in zip(LABELS.items(), (200, 3000, 800)):
        sf.write(root / name, sine(1.0, freq, seed=freq), 16000)
    records = [{"messages": [{"role": "user", "content": "<audio>What's that sound?"},
                             {"role": "assistant", "content": label}], "audios": [name]} for name, label in LABELS.items()]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def cuda_config(tiny_checkpoint, data, output, **kw) -> TrainConfig:
    return TrainConfig(model=str(tiny_checkpoint[0]), data=str(data / "sft.jsonl"), output=str(output), progress=False,
                       device="cuda", **kw)


def test_bf16_sft_on_cuda_overfits_and_answers(tiny_checkpoint, sft_data, tmp_path):
    run = train(cuda_config(tiny_checkpoint, sft_data, tmp_path / "sft", stage="sft", max_steps=30, lr=4e-3,
                            batch_size=3, warmup_steps=5, precision="bf16"))
    losses = [r["loss"] for r in run.history]
    assert losses[-1] <= 0.1 * losses[0], losses
    trained = qwen2audio.load(run.output, device="cuda", progress=False)
    answers = {name: trained.chat(analysis(str(sft_data / name)), max_new_tokens=16) for name in LABELS}
    assert answers == LABELS


def test_resume_on_cuda_continues_where_it_stopped(tiny_checkpoint, sft_data, tmp_path):
    common = dict(stage="sft", batch_size=1, grad_accum=2, max_steps=6, lr=3e-3, warmup_steps=2, seed=7, precision="fp32")
    straight = train(cuda_config(tiny_checkpoint, sft_data, tmp_path / "straight", **common))
    first = train(cuda_config(tiny_checkpoint, sft_data, tmp_path / "resumed", stop_at_step=3, **common))
    assert first.step == 3 and not first.finished
    second = train(cuda_config(tiny_checkpoint, sft_data, tmp_path / "resumed", resume="latest", **common))
    assert second.finished
    # GPU kernels may reduce in another order from run to run: equal up to float32 noise, not bit for bit.
    assert [r["loss"] for r in second.history] == pytest.approx([r["loss"] for r in straight.history[3:]], rel=1e-4)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_torchrun_on_one_gpu_trains_there(tiny_checkpoint, sft_data, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                           "-m", "qwen2audio", "train", "--model", str(tiny_checkpoint[0]),
                           "--data", str(sft_data / "sft.jsonl"), "--output", str(tmp_path / "ddp"), "--max-steps", "3",
                           "--batch-size", "1", "--no-progress", "--device", "cuda"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device cuda" in proc.stdout, proc.stdout[-2000:]
    assert (tmp_path / "ddp" / "model.safetensors").is_file()
