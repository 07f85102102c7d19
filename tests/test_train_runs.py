"""Training runs on a tiny random model: overfitting + answering through the API, SFT -> DPO, exact
resume, a kill during a checkpoint save, LoRA merge / PEFT parity, torchrun on CPU, and the CLI.

The subprocess runs (CLI, torchrun, the killed run) start with the first test and run one at a time
in a background thread, so their interpreter start-up overlaps the in-process runs; the whole
module takes about 35 s on 2 idle cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from tiny import sine

import qwen2audio
from qwen2audio import Qwen2AudioModel, Qwen2AudioProcessor
from qwen2audio.chat import TASK_PROMPTS, raw_prompt
from qwen2audio.train import checkpoint as ckpt
from qwen2audio.train.config import TrainConfig, TrainConfigError
from qwen2audio.train.data import Collate, ExampleDataset
from qwen2audio.train.lora import load_adapter
from qwen2audio.train.loop import train
from qwen2audio.train.objectives import sequence_logps, split_pairs
from qwen2audio.train.records import load_examples

QUESTION = "What's that sound?"
LABELS = {"low.wav": "a low hum", "high.wav": "a high beep", "noise.wav": "white noise", "mid.wav": "a middle tone"}
SFT = dict(stage="sft", max_steps=30, lr=4e-3, batch_size=4, warmup_steps=5)


# ---- data --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("train_runs")
    waves = {"low.wav": sine(1.0, 200, seed=1), "high.wav": sine(1.0, 3000, seed=2),
             "noise.wav": (0.3 * np.random.default_rng(3).standard_normal(16000)).astype(np.float32),
             "mid.wav": sine(1.5, 800, seed=4)}
    for name, wav in waves.items():
        sf.write(root / name, wav, 16000)

    def jsonl(name, records):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        return root / name

    c = {"root": root, "base": tiny_checkpoint[0]}
    # SFT: ms-swift tags. DPO: structured parts; the preferred answer is one the SFT model finds unlikely.
    c["sft"] = jsonl("sft.jsonl", [{"messages": [{"role": "user", "content": f"<audio>{QUESTION}"},
                                                 {"role": "assistant", "content": label}], "audios": [name]}
                                   for name, label in LABELS.items()])
    c["dpo"] = jsonl("dpo.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "audio", "audio": name}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": f"I hear {label}"}], "rejected_response": label} for name, label in LABELS.items()])
    c["pretrain"] = jsonl("pretrain.jsonl", [
        {"task": "asr", "audio": "low.wav", "label": "hello world", "language": "en"},
        {"task": "caption", "audio": "high.wav", "label": "a high beep"},
        {"task": "emotion", "audio": "mid.wav", "label": "happy"},
        {"task": "translation", "audio": "noise.wav", "label": "good morning", "source_language": "de",
         "target_language": "en"}])
    c["bad"] = jsonl("bad.jsonl", [{"messages": [{"role": "user", "content": "<audio>Hi"}], "audios": ["low.wav"]}])
    with open(c["bad"], "a") as f:
        f.write("{oops\n")
    return c


def config(corpus, output, **kw) -> TrainConfig:
    defaults = dict(model=str(corpus["base"]), data=str(corpus["sft"]), progress=False, device="cpu")
    return TrainConfig(output=str(output), **{**defaults, **kw})


# ---- subprocesses, started together ------------------------------------------------------------
def _run(args, cwd=None, timeout=300):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    from qwen2audio.train import checkpoint, loop
    from qwen2audio.train.config import TrainConfig, TrainConfigError
    real, calls = checkpoint._write_tensors, []
    def dying(tensors, path):  # the 2nd save: write its first file, then die as if killed
        calls.append(path)
        real(tensors, path)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint._write_tensors = dying
    loop.train(TrainConfig(**json.loads(sys.argv[1])))
""")


@pytest.fixture(scope="module")
def procs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_procs")
    base, py = str(corpus["base"]), sys.executable
    (root / "cfg.toml").write_text('stage = "sft"\nmax_steps = 35\nbatch_size = 4\nwarmup_steps = 5\nlr = 1e-4\n')
    killed_cfg = dict(model=base, data=str(corpus["sft"]), output=str(root / "killed"), max_steps=6, save_every=2,
                      batch_size=2, lr=1e-3, progress=False, device="cpu")
    runs = {
        "cli": [py, "-m", "qwen2audio", "train", "--config", str(root / "cfg.toml"), "--stage", "pretrain",
                "--model", base, "--data", str(corpus["pretrain"]), "--output", str(root / "cli"),
                "--set", "lr=3e-3", "--no-progress", "--device", "cpu"],
        "cli_bad": [py, "-m", "qwen2audio", "train", "--model", base, "--data", str(corpus["bad"]),
                    "--output", str(root / "bad")],
        "torchrun": [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "qwen2audio",
                     "train", "--model", base, "--data", str(corpus["sft"]), "--output", str(root / "ddp"),
                     "--max-steps", "4", "--batch-size", "1", "--lr", "1e-3", "--no-progress", "--device", "cpu"],
        "killed": [py, "-c", KILLED_RUN, json.dumps(killed_cfg)],
    }
    pool = ThreadPoolExecutor(max_workers=1)  # 2 cores: one subprocess (torchrun: two) beside the in-process runs
    futures = {name: pool.submit(_run, args) for name, args in runs.items()}
    yield {"root": root, "killed_cfg": killed_cfg, **futures}
    pool.shutdown(wait=True)


# ---- overfitting, then answering through qwen2audio.load ---------------------------------------
@pytest.fixture(scope="module")
def sft_run(corpus, procs, tmp_path_factory):
    return train(config(corpus, tmp_path_factory.mktemp("sft") / "out", **SFT))


def chat(pipe, name, corpus):
    return pipe.chat([{"role": "user", "content": [{"type": "audio", "audio": str(corpus["root"] / name)},
                                                   {"type": "text", "text": QUESTION}]}], max_new_tokens=16)


def test_sft_overfits_and_answers_through_the_api(sft_run, corpus):
    losses = [r["loss"] for r in sft_run.history]
    assert len(losses) == SFT["max_steps"] and losses[-1] <= 0.1 * losses[0], losses
    pipe = qwen2audio.load(sft_run.output, device="cpu", progress=False)
    assert {name: chat(pipe, name, corpus) for name in LABELS} == LABELS
    metrics = [json.loads(line) for line in (sft_run.output / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, SFT["max_steps"] + 1))
    assert all(m["tokens_per_s"] > 0 and m["lr"] > 0 for m in metrics)


# ---- DPO after SFT -----------------------------------------------------------------------------
def preference_accuracy(model_dir, corpus) -> float:
    """Fraction of pairs where the model gives the chosen answer a higher log-probability."""
    model = Qwen2AudioModel.from_pretrained(model_dir)
    proc = Qwen2AudioProcessor.from_pretrained(model_dir)
    examples = load_examples(corpus["dpo"], "dpo", proc.tokenizer, 1024, log=None).examples
    batch = Collate(proc.tokenizer.pad_id, proc.n_mels)([ExampleDataset(examples)[i] for i in range(len(examples))])
    inputs = ("input_ids", "attention_mask", "input_features", "feature_attention_mask")
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in inputs}).logits
    chosen, rejected = split_pairs(sequence_logps(logits, batch["labels"]), batch["n_pairs"])
    return float((chosen > rejected).float().mean())


def test_dpo_after_sft_raises_preference_accuracy(sft_run, corpus, tmp_path):
    before = preference_accuracy(sft_run.output, corpus)
    cfg = config(corpus, tmp_path / "dpo", stage="dpo", model=str(sft_run.output), data=str(corpus["dpo"]),
                 eval_data=str(corpus["dpo"]), beta=0.05, max_steps=12, lr=2e-3, batch_size=4)
    result = train(cfg)
    after = preference_accuracy(result.output, corpus)
    print(f"preference accuracy (log p chosen > log p rejected): before {before:.2f}, after {after:.2f}")
    assert before == 0.0 and after == 1.0
    first, last = result.history[0], result.history[-1]
    assert first["rewards/accuracy"] == 0.0 and first["loss"] == pytest.approx(np.log(2), abs=1e-5)  # policy == reference
    assert last["eval_rewards/accuracy"] == 1.0 and last["eval_rewards/margins"] > 0 and last["eval_loss"] < 0.3
    assert last["rewards/chosen"] > 0 > last["rewards/rejected"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])  # frozen copy / adapters switched off
def test_dpo_precomputed_reference_equals_live_reference(sft_run, corpus, tmp_path, lora):
    common = dict(stage="dpo", model=str(sft_run.output), data=str(corpus["dpo"]), beta=0.1, max_steps=3,
                  lr=1e-2 if lora else 1e-3, batch_size=2, lora=lora, lora_dropout=0.0)
    copy = train(config(corpus, tmp_path / "copy", dpo_reference="copy", **common)).history
    pre = train(config(corpus, tmp_path / "pre", dpo_reference="precompute", **common)).history
    assert [r["loss"] for r in copy] == pytest.approx([r["loss"] for r in pre], rel=1e-4, abs=1e-6)
    assert copy[-1]["loss"] != pytest.approx(copy[0]["loss"])  # the reference really stayed fixed while training


# ---- memory / precision options ----------------------------------------------------------------
def test_gradient_checkpointing_bf16_and_periodic_eval(corpus, tmp_path):
    common = dict(max_steps=3, batch_size=2, lr=1e-3, freeze_audio_tower=False, eval_data=str(corpus["sft"]),
                  eval_every=2)
    plain = train(config(corpus, tmp_path / "plain", **common)).history
    checkpointed = train(config(corpus, tmp_path / "gc", gradient_checkpointing=True, **common)).history
    # Recomputing activations changes memory, not the numbers.
    assert [r["loss"] for r in checkpointed] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    assert [r["grad_norm"] for r in checkpointed] == pytest.approx([r["grad_norm"] for r in plain], rel=1e-4)
    assert [r["step"] for r in plain if "eval_loss" in r] == [2, 3]
    assert plain[-1]["eval_loss"] < plain[1]["eval_loss"]
    bf16 = train(config(corpus, tmp_path / "bf16", precision="bf16", **common)).history  # CPU autocast
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in plain], rel=0.05)
    assert [r["loss"] for r in bf16] != [r["loss"] for r in plain]  # autocast really ran in bf16


# ---- resume ------------------------------------------------------------------------------------
def test_resume_continues_exactly(corpus, tmp_path):
    # LoRA with dropout (RNG state), accumulation over an epoch boundary (data position), AdamW state.
    common = dict(lora=True, lora_r=4, lora_dropout=0.1, batch_size=1, grad_accum=2, max_steps=6, lr=3e-3,
                  warmup_steps=2, seed=7)
    straight = train(config(corpus, tmp_path / "straight", **common))
    first = train(config(corpus, tmp_path / "resumed", stop_at_step=3, **common))
    assert not first.finished and first.step == 3
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    second = train(config(corpus, tmp_path / "resumed", resume="latest", **common))
    assert second.finished and second.step == 6
    a = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert [r["loss"] for r in second.history] == pytest.approx([r["loss"] for r in straight.history[3:]], rel=1e-5)
    with pytest.raises(TrainConfigError, match="already holds checkpoints"):  # a fresh run must not mix in
        train(config(corpus, tmp_path / "resumed", **common))


def test_resume_leaves_one_metrics_row_per_step_in_order(corpus, tmp_path):
    common = dict(max_steps=5, save_every=2, batch_size=2, lr=1e-3)
    straight = train(config(corpus, tmp_path / "straight", **common))
    train(config(corpus, tmp_path / "run", stop_at_step=3, **common))
    root = tmp_path / "run" / "checkpoints"
    # As if killed after logging step 3 but before its checkpoint was in place: steps 3.. run again.
    (root / "step-00000003").rename(root / ".tmp-step-00000003-killed")
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss"')  # a row cut short by the kill
    resumed = train(config(corpus, tmp_path / "run", resume="latest", **common))
    assert [r["step"] for r in resumed.history] == [3, 4, 5]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in straight.history], rel=1e-5)
    train(config(corpus, tmp_path / "run", resume=str(root / "step-00000004"), **common))  # not the latest
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def test_kill_during_save_leaves_a_loadable_checkpoint(procs, corpus):
    proc = procs["killed"].result()
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    root = Path(procs["killed_cfg"]["output"]) / "checkpoints"
    partial = list(root.glob(".tmp-step-00000004-*"))
    assert len(partial) == 1 and (partial[0] / ckpt.TRAINABLE).exists() and not (partial[0] / ckpt.STATE).exists()
    latest = ckpt.latest_checkpoint(root)
    assert latest.name == "step-00000002"
    assert ckpt.load_checkpoint(latest).state["step"] == 2
    result = train(TrainConfig(**{**procs["killed_cfg"], "resume": "latest"}))
    assert result.finished and result.history[0]["step"] == 3
    assert not list(root.glob(".tmp-*"))  # debris of the killed save is cleaned up
    assert qwen2audio.load(result.output, device="cpu", progress=False)


# ---- exporting a step checkpoint ---------------------------------------------------------------
def test_export_checkpoint_writes_the_model_the_run_had_at_that_step(corpus, tmp_path, capsys):
    from qwen2audio.cli import main

    run = train(config(corpus, tmp_path / "run", lora=True, lora_r=4, max_steps=4, save_every=2, lr=1e-2,
                       batch_size=2))
    steps = run.output / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(steps)] == ["step-00000002", "step-00000004"]
    for step in (2, 4):
        assert main(["export-checkpoint", str(steps / f"step-0000000{step}"), "--output", str(tmp_path / f"at{step}")]) == 0
    final, at4, at2 = (load_file(d / "model.safetensors") for d in (run.output, tmp_path / "at4", tmp_path / "at2"))
    assert final.keys() == at4.keys() == at2.keys()
    assert all(torch.equal(final[k], at4[k]) for k in final)  # the last step's export is the run's own output
    assert not all(torch.equal(final[k], at2[k]) for k in final)  # an earlier step is another model
    adapter = "adapter/adapter_model.safetensors"
    a, b = load_file(run.output / adapter), load_file(tmp_path / "at4" / adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert qwen2audio.load(tmp_path / "at2", device="cpu", progress=False)

    capsys.readouterr()
    assert main(["export-checkpoint", str(steps / "step-00000002"), "--output", str(tmp_path / "at4")]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert main(["export-checkpoint", str(tmp_path / "at2"), "--output", str(tmp_path / "x")]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


# ---- LoRA: merged == base + adapter, and PEFT reads the adapter --------------------------------
def test_lora_merge_equals_base_plus_adapter_and_peft_agrees(corpus, tmp_path):
    from peft import PeftModel
    from transformers import Qwen2AudioForConditionalGeneration

    # Adapters in all three parts (audio tower, projector, LLM), trained enough to change the logits.
    cfg = config(corpus, tmp_path / "lora", lora=True, freeze_audio_tower=False, lora_r=4, lora_alpha=8.0,
                 max_steps=4, lr=2e-2, batch_size=4)
    out = train(cfg).output
    adapter = out / "adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0
    keys = load_file(adapter / "adapter_model.safetensors").keys()  # transformers-5 module paths
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.audio_tower.layers.0.fc1.lora_B.weight" in keys
    assert "base_model.model.model.multi_modal_projector.linear.lora_A.weight" in keys
    assert len(keys) == 2 * (7 * 2 + 6 * 2 + 1)  # A and B for 7 LLM + 6 audio linears per layer, 2 layers, + projector

    proc = Qwen2AudioProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": str(corpus["root"] / "low.wav")},
                                             {"type": "text", "text": QUESTION}]}]
    inputs = dict(proc.prepare_chats([messages]))
    with torch.no_grad():
        base = Qwen2AudioModel.from_pretrained(corpus["base"])
        base_logits = base(**inputs).logits
        with_adapter = load_adapter(base, adapter)(**inputs).logits
        merged = Qwen2AudioModel.from_pretrained(out)(**inputs).logits
        assert (merged - base_logits).abs().max() > 0.1  # the adapter does change the model
        torch.testing.assert_close(merged, with_adapter, rtol=1e-4, atol=1e-4)

        hf_base = Qwen2AudioForConditionalGeneration.from_pretrained(corpus["base"]).eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(hf_base, adapter).eval()
        # PEFT only warns about adapter keys it could not place (and then runs without them)
        assert not [w for w in caught if "keys" in str(w.message)], [str(w.message)[:300] for w in caught]
        peft_logits = peft_model(**inputs).logits
        torch.testing.assert_close(peft_logits, merged, rtol=1e-4, atol=1e-4)
        hf_merged = Qwen2AudioForConditionalGeneration.from_pretrained(out).eval()(**inputs).logits
        torch.testing.assert_close(hf_merged, merged, rtol=1e-4, atol=1e-4)  # transformers opens the output too


def test_lora_parts_adapt_some_parts_and_train_the_rest_in_full(corpus, tmp_path):
    # The default model's recipe: LoRA in the audio tower, the projector trained whole, the LLM frozen.
    cfg = config(corpus, tmp_path / "mixed", lora=True, lora_parts=["audio_tower"], freeze_audio_tower=False,
                 freeze_llm=True, lora_r=4, lora_dropout=0.0, max_steps=3, lr=1e-2, batch_size=2, save_every=3)
    run = train(cfg)
    saved = load_file(run.output / "checkpoints" / "step-00000003" / "trainable.safetensors")
    assert {"multi_modal_projector.linear.weight", "multi_modal_projector.linear.bias"} <= saved.keys()
    adapted = {k for k in saved if ".lora_" in k}
    assert adapted and all(k.startswith("audio_tower.") for k in adapted)
    assert len(adapted) == 2 * 6 * 2  # A and B for the 6 linears of each of the 2 audio layers
    assert not [k for k in saved if k.startswith("language_model.")]
    base = Qwen2AudioModel.from_pretrained(corpus["base"])
    assert not torch.equal(saved["multi_modal_projector.linear.weight"], base.multi_modal_projector.linear.weight)
    assert any(saved[k].abs().max() > 0 for k in adapted if ".lora_B." in k)  # B starts at zero: it learned

    with pytest.raises(TrainConfigError, match="lora_parts: 'llm' is not a trainable part"):
        config(corpus, tmp_path / "bad", lora=True, lora_parts=["llm"], freeze_llm=True).validate()


# ---- torchrun on CPU (gloo) --------------------------------------------------------------------
def test_torchrun_two_processes_match_one_process(procs, corpus, tmp_path):
    proc = procs["torchrun"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = procs["root"] / "ddp"
    assert proc.stdout.count("resolved config (2 process(es)") == 1  # only rank 0 prints
    assert "replicas in sync: yes" in proc.stdout
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-00000004"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]  # one writer
    # 2 ranks x batch 1 see the same examples per step as 1 process x batch 2: same update.
    single = train(config(corpus, tmp_path / "single", max_steps=4, batch_size=2, lr=1e-3))
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in single.history], rel=1e-4)
    assert [m["tokens"] for m in metrics] == [m["tokens"] for m in single.history]
    a, b = load_file(out / "model.safetensors"), load_file(single.output / "model.safetensors")
    # Summing the gradient over two ranks rounds differently from one batch of two, and Adam divides by
    # sqrt(v): where v is tiny, a rounding-level gradient difference becomes a visible one (3.7e-5 on one
    # weight in 4,096 seen on a CPU without AMX). Adam moves nearly every weight by about lr (1e-3) per step,
    # in a direction set by the gradient, so a rank stepping on its own half-batch misses by far more than
    # a tenth of that.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)


# ---- the CLI, end to end -----------------------------------------------------------------------
def test_cli_pretrain_end_to_end(procs, corpus):
    proc = procs["cli"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'stage = "pretrain"' in proc.stdout and "lr = 0.003" in proc.stdout and "max_steps = 35" in proc.stdout
    out = procs["root"] / "cli"
    assert "lr = 0.003" in (out / "train_config.toml").read_text()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < 0.1 * metrics[0]["loss"]
    pipe = qwen2audio.load(out, device="cpu", progress=False)
    low, high = str(corpus["root"] / "low.wav"), str(corpus["root"] / "high.wav")
    # The paper's prompts, through the inference API: ASR (model emits the tag / tag given) and captioning.
    assert pipe.transcribe(low, max_new_tokens=12) == "hello world"
    assert pipe.transcribe(low, language="en", max_new_tokens=12) == "hello world"
    assert pipe.complete([raw_prompt(TASK_PROMPTS["caption"])], [high], max_new_tokens=12)[0] == " a high beep"


def test_cli_reports_bad_records(procs, corpus):
    proc = procs["cli_bad"].result()
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert f"{corpus['bad']}:1: no assistant turn to train on" in lines
    assert any(line.startswith(f"{corpus['bad']}:2: not valid JSON") for line in lines)
    assert lines[-1].startswith(f"qwen2audio: error: {corpus['bad']}: 2 bad record(s)")
    assert "Traceback" not in proc.stderr
