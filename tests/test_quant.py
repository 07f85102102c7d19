"""Weight-only int8 / int4 quantisation (qwen2audio.quant): kernels against their dequantised reference,
the module swap, save/load, and --quantize through the real CLI and server.

Tolerance of a quantised layer against `x @ dequantize().T + b` (the exact float32 product with the
very weights the kernel uses): the packed CPU kernels round the activations to bfloat16 (relative error
<= 2^-9 per element) and return bfloat16 (<= 2^-9 of the result), so per output element

    |y - ref| <= 2^-7 * (|x| @ |W|.T)        (twice the worst case of those two roundings)

The dequantising path (other devices and shapes) and the compiled int8 dot product (batch-1 rows) are float32
throughout: 1e-5 of the same scale.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from tiny import save_reference_checkpoint, sine
from torch import nn

import qwen2audio
from qwen2audio import cli
from qwen2audio.model import Qwen2AudioModel
from qwen2audio.quant import Int4Linear, Int8Linear, QuantizationError, QuantLinear, quantize_model
from qwen2audio.quant.linear import unpack_int4_cpu

BF16_TOL = 2.0 ** -7


def _check_close(layer: QuantLinear, x: torch.Tensor, bias):
    w = layer.dequantize()
    ref = torch.nn.functional.linear(x, w, bias)
    scale = torch.nn.functional.linear(x.abs(), w.abs()) + 1e-6
    tol = BF16_TOL if layer.kernel != "dequant" else 1e-5
    err = (layer(x) - ref).abs()
    assert (err <= tol * scale).all(), f"{layer}: worst error / scale {(err / scale).max():.2e} > {tol:.1e}"


# (out, in): multiples of 16 (packed CPU kernels) and a tiny vocabulary's 403 rows (int4's dequantising path)
SHAPES = [(64, 64), (160, 96), (403, 96), (48, 256)]


@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 37])
def test_int8_linear_equals_its_dequantised_matmul(out_features, in_features, rows):
    g = torch.Generator().manual_seed(out_features + rows)
    w, b = torch.randn(out_features, in_features, generator=g) * 0.1, torch.randn(out_features, generator=g)
    layer = Int8Linear(w, b)
    assert layer.kernel == "int8pack"
    x = torch.randn(2, rows, in_features, generator=g)
    _check_close(layer, x, b)
    # the quantisation itself: codes are the nearest steps of one scale per row
    step = layer.scales.float()[:, None]
    assert ((layer.dequantize() - w).abs() <= 0.5 * step + 2.0 ** -8 * w.abs()).all()


INT4_CASES = [(o, i, g) for o, i in SHAPES for g in (32, 64) if i % g == 0]  # groups must tile the input


@pytest.mark.parametrize("out_features, in_features, group_size", INT4_CASES)
@pytest.mark.parametrize("rows", [1, 3, 37])
def test_int4_linear_equals_its_dequantised_matmul(out_features, in_features, rows, group_size):
    g = torch.Generator().manual_seed(out_features * rows + group_size)
    w = torch.randn(out_features, in_features, generator=g) * 0.1
    layer = Int4Linear(w, None, group_size=group_size)
    assert layer.kernel == ("int4pack" if out_features % 16 == 0 else "dequant")
    x = torch.randn(rows, in_features, generator=g)
    _check_close(layer, x, None)
    step = layer.scales_and_zeros[..., 0].float().t().repeat_interleave(group_size, dim=1)
    assert ((layer.dequantize() - w).abs() <= 0.5 * step + 2.0 ** -8 * w.abs().amax()).all()


def test_int8_compiled_kernel_splits_long_rows_and_keeps_the_packed_kernel_when_compiling_fails(monkeypatch):
    """Batch-1 int8 rows go through the compiled dot product, long rows in equal parts (float32 throughout,
    so 1e-5 of the scale); a machine where inductor cannot compile warns once and uses the packed kernel."""
    from qwen2audio.quant import linear

    g = torch.Generator().manual_seed(5)
    in_features = 2 * linear.MAX_DOT + 64  # 3 parts of 1728
    assert linear._dot_split(in_features) == 3
    monkeypatch.setitem(linear._COMPILED, "ok", True)  # on any CPU (it is the default on AVX-512 ones)
    layer = Int8Linear(torch.randn(32, in_features, generator=g) * 0.1)
    x = torch.randn(1, in_features, generator=g)
    w = layer.dequantize()
    ref, scale = x @ w.T, x.abs() @ w.abs().T
    assert ((layer(x) - ref).abs() <= 1e-5 * scale).all()

    def no_compiler():
        def fail(*args):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(linear, "int8_dots", no_compiler)
    with pytest.warns(RuntimeWarning, match="packed int8 kernel"):
        y = layer(x)
    assert linear._COMPILED["ok"] is False
    assert ((y - ref).abs() <= BF16_TOL * scale).all()


def test_dequantising_path_matches_the_packed_kernel():
    """The fallback path (any device) and the CPU kernel compute the same product."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 128, generator=g), torch.randn(5, 128, generator=g)
    for layer in (Int8Linear(w), Int4Linear(w, group_size=32)):
        fallback = type(layer)(w) if isinstance(layer, Int8Linear) else Int4Linear(w, group_size=32)
        fallback.kernel = "dequant"
        if isinstance(layer, Int4Linear):
            fallback.qweight = layer._codes().to(torch.uint8)
        packed, plain = layer(x), fallback(x)
        scale = torch.nn.functional.linear(x.abs(), layer.dequantize().abs())
        assert ((packed - plain).abs() <= BF16_TOL * scale).all()


@pytest.mark.parametrize("n", [16, 32, 48, 80, 96])
def test_int4_unpack_reads_the_cpu_packed_layout(n):
    codes = torch.randint(0, 16, (n, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(unpack_int4_cpu(packed, n, 64, torch.int32), codes)


def test_bad_options():
    with pytest.raises(QuantizationError, match="int3"):
        quantize_model(nn.Module(), "int3")
    with pytest.raises(ValueError, match="group size"):
        Int4Linear(torch.randn(16, 64), group_size=48)


# ---- whole models --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_tied")
    save_reference_checkpoint(directory, "gqa_tied")
    return directory


def _inputs(model_dir):
    pipe = qwen2audio.load(model_dir, device="cpu", progress=False)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": sine(1.0, 440)},
                                             {"type": "text", "text": "What's that sound?"}]}]
    return pipe.processor.prepare_chats([messages])


def _logits(model, inputs):
    with torch.inference_mode():
        return model(**inputs).logits


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_model_swaps_the_llm_linears_only(tiny_checkpoint, mode):
    model = Qwen2AudioModel.from_pretrained(tiny_checkpoint[0])
    n_llm = sum(isinstance(m, nn.Linear) for m in model.language_model.model.modules())
    quantize_model(model, mode)
    llm = model.language_model
    kinds = [type(m) for m in llm.model.modules() if isinstance(m, (nn.Linear, QuantLinear))]
    assert len(kinds) == n_llm and set(kinds) == {Int8Linear if mode == "int8" else Int4Linear}
    assert isinstance(llm.lm_head, Int8Linear)  # int8 in both modes
    assert not any(isinstance(m, QuantLinear) for m in model.audio_tower.modules())
    assert isinstance(model.multi_modal_projector.linear, nn.Linear)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_logits_stay_close_to_full_precision(tiny_checkpoint, mode):
    directory = tiny_checkpoint[0]
    inputs = _inputs(directory)
    full = _logits(Qwen2AudioModel.from_pretrained(directory), inputs)
    quant = _logits(qwen2audio.load(directory, device="cpu", progress=False, quantize=mode).model, inputs)
    rel = (quant - full).norm() / full.norm()
    # Random weights (std 0.15) and two layers amplify: measured 0.024 (int8) and 0.27 (int4) relative error.
    assert rel < (0.05 if mode == "int8" else 0.5), rel


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("variant", ["base", "tied"])
def test_saved_quantised_model_loads_to_identical_logits(tiny_checkpoint, tied_checkpoint, tmp_path, mode, variant):
    """save_pretrained writes the dequantised weights (an ordinary checkpoint); quantising them again on load
    gives back the same codes and scales, so the logits are bit-identical."""
    directory = tiny_checkpoint[0] if variant == "base" else tied_checkpoint
    inputs = _inputs(directory)
    pipe = qwen2audio.load(directory, device="cpu", progress=False, quantize=mode)
    before = _logits(pipe.model, inputs)
    pipe.model.save_pretrained(tmp_path / "saved")
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json",
                 "chat_template.json"):
        if (directory / name).exists():
            (tmp_path / "saved" / name).write_bytes((directory / name).read_bytes())
    again = qwen2audio.load(tmp_path / "saved", device="cpu", progress=False, quantize=mode)
    assert torch.equal(_logits(again.model, inputs), before)
    # and quantising the same checkpoint twice is deterministic
    assert torch.equal(_logits(qwen2audio.load(directory, device="cpu", progress=False, quantize=mode).model, inputs),
                       before)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_batch_equals_one_by_one(tiny_checkpoint, mode):
    """Batched decoding (several rows per step) with quantised weights answers as each request alone."""
    pipe = qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False, quantize=mode)
    chats = [[{"role": "user", "content": [{"type": "audio", "audio": sine(s, f)},
                                           {"type": "text", "text": q}]}]
             for s, f, q in [(1.0, 440, "What's that sound?"), (0.6, 880, "Transcribe the speech."),
                             (1.3, 300, "How about this one?")]]
    batch = pipe.chat_batch(chats, max_new_tokens=10)
    assert batch == [pipe.chat(c, max_new_tokens=10) for c in chats]
    assert all(batch)


# ---- the command line and the server ---------------------------------------------------------------
def test_every_model_command_takes_quantize():
    parser = cli.build_parser()
    for command in (["ask", "-p", "hi"], ["chat"], ["transcribe", "a.wav"], ["serve"], ["eval", "--task", "vsc"]):
        assert parser.parse_args(command + ["--quantize", "int4"]).quantize == "int4"
        assert parser.parse_args(command).quantize is None
    with pytest.raises(SystemExit):
        parser.parse_args(["ask", "-p", "hi", "--quantize", "int3"])


def _run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qwen2audio", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_cli_ask_and_transcribe_with_quantize(tiny_checkpoint, tmp_path):
    import soundfile as sf

    directory = tiny_checkpoint[0]
    wav = tmp_path / "a.wav"
    sf.write(wav, sine(1.0, 440, seed=1), 16000)
    common = ["--model", str(directory), "--device", "cpu", "--max-new-tokens", "8"]
    with ThreadPoolExecutor(2) as pool:
        ask = pool.submit(_run_cli, "ask", str(wav), "--prompt", "What's that sound?", "--quantize", "int8", *common)
        tr = pool.submit(_run_cli, "transcribe", str(wav), "--quantize", "int4", *common)
        ask, tr = ask.result(), tr.result()
    assert ask.returncode == 0 and tr.returncode == 0, ask.stderr + tr.stderr
    from qwen2audio.audio import load_audio

    clip = load_audio(str(wav))
    int8 = qwen2audio.load(directory, device="cpu", progress=False, quantize="int8")
    expected = int8.chat(cli.ask_messages([clip], "What's that sound?"), max_new_tokens=8)
    assert ask.stdout == expected + "\n"
    int4 = qwen2audio.load(directory, device="cpu", progress=False, quantize="int4")
    assert tr.stdout == cli.one_line(int4.transcribe(clip, max_new_tokens=8)) + "\n"


def test_serve_with_quantize_answers_concurrent_requests_as_each_alone(tiny_checkpoint):
    directory = tiny_checkpoint[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qwen2audio", "serve", "--model", str(directory), "--device", "cpu",
                             "--quantize", "int8", "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.3)
        questions = ["What's that sound?", "Transcribe the speech.", "How about this one?", "hello world"]

        def ask(q):
            body = {"model": directory.name, "messages": [{"role": "user", "content": q}], "max_tokens": 10, "temperature": 0}
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(len(questions)) as pool:  # decoded together: the engine's batch > 1 path
            together = list(pool.map(ask, questions))
        pipe = qwen2audio.load(directory, device="cpu", progress=False, quantize="int8")
        assert together == [pipe.chat([{"role": "user", "content": q}], max_new_tokens=10) for q in questions]
    finally:
        proc.terminate()
        proc.wait(30)
