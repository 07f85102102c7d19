"""`qwen2audio train --fsdp` (FSDP2 + torch.distributed.checkpoint) on CPU with gloo and a tiny model.

Two processes under torchrun against one process with the same global batch; stop at step 10 and resume
to 20 against an uninterrupted run; the same sharded checkpoint resumed on one process; the output
directory opened by transformers; the memory each rank holds against the plan's formula. The two torchrun
runs go in a background thread when the first test asks for them, beside the in-process runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from tiny import sine

from qwen2audio.train import checkpoint as ckpt
from qwen2audio.train import memory
from qwen2audio.train.config import TrainConfig, TrainConfigError
from qwen2audio.train.fsdp import ShardWriter, lockstep_padding
from qwen2audio.train.loop import train

LABELS = {"low.wav": "a low hum", "high.wav": "a high beep", "noise.wav": "white noise", "mid.wav": "a middle tone"}
STEPS, HALF = 20, 10
# 6 examples (4 with audio, 2 text-only: a rank then runs the audio side on silence), global batch 2.
COMMON = ["--max-steps", str(STEPS), "--lr", "2e-3", "--no-progress", "--device", "cpu", "--set", "warmup_steps=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("fsdp_data")
    waves = {"low.wav": sine(1.0, 200, seed=1), "high.wav": sine(1.0, 3000, seed=2),
             "noise.wav": (0.3 * np.random.default_rng(3).standard_normal(16000)).astype(np.float32),
             "mid.wav": sine(1.5, 800, seed=4)}
    for name, wav in waves.items():
        sf.write(root / name, wav, 16000)
    records = [{"messages": [{"role": "user", "content": "<audio>What's that sound?"},
                             {"role": "assistant", "content": label}], "audios": [name]} for name, label in LABELS.items()]
    records += [{"messages": [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "hello world"}]},
                {"messages": [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "0123456789"}]}]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "base": str(tiny_checkpoint[0]), "sft": str(root / "sft.jsonl")}


def _run(args, timeout=600):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", OMP_NUM_THREADS="1")
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


def _train_cmd(data, output, nproc, *extra):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    return launcher + ["-m", "qwen2audio", "train", "--model", data["base"], "--data", data["sft"], "--output",
                       str(output), "--fsdp", *COMMON, *extra]


TWO = ["--batch-size", "1", "--save-every", str(HALF)]


@pytest.fixture(scope="module")
def pool():
    workers = ThreadPoolExecutor(max_workers=2)
    yield workers
    workers.shutdown(wait=True)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory, pool):
    """The uninterrupted 2-rank run; then, from a copy of its step-10 checkpoint (the state a run stopped there
    saves), the same 2 ranks resumed to step 20, in a fresh torchrun."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    straight = pool.submit(_run, _train_cmd(data, root / "straight", 2, *TWO))

    def resume_from_step_10():
        first = straight.result()
        if first.returncode:
            return first
        _copy_at_step(root / "straight", root / "resumed", HALF)
        return _run(_train_cmd(data, root / "resumed", 2, *TWO, "--resume"))

    return {"root": root, "straight": straight, "resumed": pool.submit(resume_from_step_10)}


def _copy_at_step(src: Path, dst: Path, step: int) -> None:
    """A run's output as it was after `step`: that checkpoint only, no final model (metrics are trimmed on resume)."""
    shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n.startswith("step-") and n != f"step-{step:08d}"
                                                      or n.startswith("model") or n == "memory.json"])


def ok(proc):
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def max_diff(a_dir: Path, b_dir: Path) -> float:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---- two ranks == one process with the same global batch; it learns; transformers reads it -------
def test_fsdp_two_ranks_match_one_process_learn_and_load_in_transformers(runs, data, tmp_path):
    from transformers import Qwen2AudioForConditionalGeneration

    from qwen2audio import Qwen2AudioModel, Qwen2AudioProcessor

    proc = ok(runs["straight"].result())
    out = runs["root"] / "straight"
    assert "FSDP: 6 units sharded over 2 rank(s), float32; the frozen audio tower whole on each rank" in proc.stdout
    assert proc.stdout.count("resolved config (2 process(es)") == 1
    sharded = [m for m in metrics(out)]
    assert [m["step"] for m in sharded] == list(range(1, STEPS + 1))

    single = train(TrainConfig(model=data["base"], data=data["sft"], output=str(tmp_path / "single"), max_steps=STEPS,
                               lr=2e-3, warmup_steps=2, batch_size=2, progress=False, device="cpu"))
    a, b = [m["loss"] for m in sharded], [m["loss"] for m in single.history]
    worst = max(abs(x - y) / y for x, y in zip(a, b))
    print(f"FSDP 2 ranks vs 1 process: loss curves differ by at most {worst:.2e} (relative); "
          f"final weights by {max_diff(out, single.output):.2e}")
    assert worst < 1e-2, (a, b)  # the issue asks for a few percent
    assert [m["tokens"] for m in sharded] == [m["tokens"] for m in single.history]
    assert max_diff(out, single.output) < 1e-2
    assert np.mean(a[-3:]) < 0.3 * np.mean(a[:3])  # it learns

    # The output directory: an ordinary checkpoint that transformers opens, with our model's logits.
    assert (out / "model.safetensors").is_file() and not list(out.glob(".model-part-*"))
    processor = Qwen2AudioProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": str(data["root"] / "low.wav")},
                                             {"type": "text", "text": "What's that sound?"}]}]
    inputs = dict(processor.prepare_chats([messages]))
    with torch.no_grad():
        ours = Qwen2AudioModel.from_pretrained(out)(**inputs).logits
        theirs = Qwen2AudioForConditionalGeneration.from_pretrained(out).eval()(**inputs).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)

    # Checkpoints are sharded: one file per rank (+ DCP's metadata), the atomic protocol's state.json last.
    step = out / "checkpoints" / f"step-{STEPS:08d}"
    assert sorted(p.name for p in (step / ckpt.SHARDED).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert ckpt.read_state(step)["format"] == ckpt.SHARDED_FORMAT
    assert not list((out / "checkpoints").glob(".tmp-*"))


# ---- resume at 10 to 20 == 20 straight, on 2 ranks and on 1 process ----------------------------------
def test_fsdp_resume_equals_an_uninterrupted_run(runs):
    ok(runs["straight"].result())
    resumed = ok(runs["resumed"].result())
    assert f"resumed from {runs['root'] / 'resumed' / 'checkpoints' / f'step-{HALF:08d}'} at step {HALF}" in resumed.stdout
    diff = max_diff(runs["root"] / "straight", runs["root"] / "resumed")
    print(f"resume at {HALF} to {STEPS} on 2 ranks vs straight: max abs weight difference {diff:.2e}")
    assert diff <= 1e-5
    straight, again = metrics(runs["root"] / "straight"), metrics(runs["root"] / "resumed")
    assert [m["step"] for m in again] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in again] == pytest.approx([m["loss"] for m in straight], rel=1e-6)


def test_fsdp_checkpoint_resumes_on_one_process_and_memory_falls_as_1_over_n(runs, data, tmp_path):
    ok(runs["straight"].result())
    _copy_at_step(runs["root"] / "straight", tmp_path / "one", HALF)
    result = train(TrainConfig(model=data["base"], data=data["sft"], output=str(tmp_path / "one"), max_steps=STEPS,
                               lr=2e-3, warmup_steps=2, batch_size=2, save_every=HALF, progress=False, device="cpu",
                               fsdp=True, resume="latest"))  # one process: FSDP in a group of one
    assert result.finished and result.history[0]["step"] == HALF + 1
    diff = max_diff(runs["root"] / "straight", tmp_path / "one")
    print(f"2 ranks to step {HALF}, then 1 process to {STEPS}, vs 2 ranks straight: max abs difference {diff:.2e}")
    assert diff < 1e-4  # one process sums the batch's gradient in another order than two ranks' reduce-scatter
    assert [m["step"] for m in metrics(tmp_path / "one")] == list(range(1, STEPS + 1))

    # What each rank holds after a step, against the plan: the sharded state halves from 1 to 2 ranks.
    two = json.loads((runs["root"] / "straight" / "memory.json").read_text())
    alone = json.loads((tmp_path / "one" / "memory.json").read_text())
    state = ("trainable_weights", "grads", "optimizer")
    held_two = [sum(r[k] for k in state) for r in two["ranks"]]
    held_one = sum(alone["ranks"][0][k] for k in state)
    print(f"sharded state per rank: 1 rank {held_one} B (plan {alone['plan_sharded_state']}), "
          f"2 ranks {held_two} B (plan {two['plan_sharded_state']}); max RSS 1 rank "
          f"{alone['ranks'][0]['max_rss'] / 2**20:.0f} MiB (the test process), 2 ranks "
          f"{[round(r['max_rss'] / 2**20) for r in two['ranks']]} MiB")
    assert held_one == pytest.approx(alone["plan_sharded_state"], rel=0.01)
    assert all(h == pytest.approx(two["plan_sharded_state"], rel=0.02) for h in held_two)  # shards pad to equal rows
    assert sum(held_two) == pytest.approx(held_one, rel=0.01) and max(held_two) < 0.52 * held_one
    # The frozen audio tower is kept whole: the same on every rank, at any count.
    assert {r["frozen_weights"] for r in two["ranks"]} == {alone["ranks"][0]["frozen_weights"]}


@pytest.mark.slow
def test_fsdp_stop_at_step_and_resume_equals_an_uninterrupted_run(runs, data, tmp_path):
    ok(runs["straight"].result())
    first = ok(_run(_train_cmd(data, tmp_path / "out", 2, *TWO, "--set", f"stop_at_step={HALF}")))
    assert f"stopped after step {HALF} of {STEPS}" in first.stdout and not (tmp_path / "out" / "model.safetensors").exists()
    ok(_run(_train_cmd(data, tmp_path / "out", 2, *TWO, "--resume")))
    diff = max_diff(runs["root"] / "straight", tmp_path / "out")
    print(f"stop at {HALF} + resume to {STEPS} vs straight: max abs weight difference {diff:.2e}")
    assert diff <= 1e-5
    assert [m["step"] for m in metrics(tmp_path / "out")] == list(range(1, STEPS + 1))


def test_export_checkpoint_writes_a_sharded_step_as_the_run_did(runs, tmp_path):
    from qwen2audio.cli import main

    ok(runs["straight"].result())
    out = runs["root"] / "straight"
    assert main(["export-checkpoint", str(out / "checkpoints" / f"step-{STEPS:08d}"), "--output", str(tmp_path / "x")]) == 0
    assert max_diff(out, tmp_path / "x") == 0.0


# ---- LoRA under FSDP ----------------------------------------------------------------------------
def test_fsdp_lora_equals_plain_lora_and_merges_while_streaming(data, tmp_path):
    """One process (a group of one): the sharded LoRA run, its adapter and its streamed merge against the
    replicated trainer's; adapters in the audio tower too, so the tower is sharded per encoder layer."""
    common = dict(model=data["base"], data=data["sft"], max_steps=4, lr=1e-2, batch_size=2, lora=True, lora_r=4,
                  lora_dropout=0.0, freeze_audio_tower=False, gradient_checkpointing=True, progress=False, device="cpu")
    plain = train(TrainConfig(output=str(tmp_path / "plain"), **common))
    sharded = train(TrainConfig(output=str(tmp_path / "fsdp"), fsdp=True, **common))
    assert [r["loss"] for r in sharded.history] == pytest.approx([r["loss"] for r in plain.history], rel=1e-5)
    adapter = "adapter/adapter_model.safetensors"
    a, b = load_file(tmp_path / "plain" / adapter), load_file(tmp_path / "fsdp" / adapter)
    assert a.keys() == b.keys() and any("audio_tower" in k for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert json.loads((tmp_path / "plain" / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((tmp_path / "fsdp" / "adapter" / "adapter_config.json").read_text())
    assert max_diff(tmp_path / "plain", tmp_path / "fsdp") < 1e-5  # merged tensor by tensor while streaming


@pytest.mark.slow
def test_fsdp_two_ranks_lora_bf16_and_dpo(runs, data, tmp_path):
    """2 ranks: LoRA in every part with bf16 compute, gradient checkpointing and text-only batches; then DPO
    (full weights, the reference a sharded frozen copy; held-out pairs split unevenly over the ranks)."""
    lora = ok(_run(_train_cmd(data, tmp_path / "lora", 2, "--batch-size", "1", "--lora", "--lr", "1e-2", "--bf16",
                              "--gradient-checkpointing", "--unfreeze", "audio_tower", "--set", "model_dtype=bfloat16")))
    assert "bf16 compute, float32 reduction and masters" in lora.stdout
    losses = [m["loss"] for m in metrics(tmp_path / "lora")]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()

    ok(runs["straight"].result())
    pairs = [json.loads(line) for line in Path(data["sft"]).read_text().splitlines()]
    for r in pairs:
        r["audios"] = [str(data["root"] / a) for a in r.get("audios", [])]  # the files stay beside sft.jsonl
        r["rejected_response"] = r["messages"][1]["content"]
        r["messages"][1]["content"] = "I hear " + r["messages"][1]["content"]
    (tmp_path / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs[:5]))
    cmd = _train_cmd(data, tmp_path / "dpo", 2, "--stage", "dpo", "--batch-size", "1", "--eval-data",
                     str(tmp_path / "dev.jsonl"), "--eval-every", "10")
    cmd[cmd.index("--model") + 1] = str(runs["root"] / "straight")
    cmd[cmd.index("--data") + 1] = str(tmp_path / "dpo.jsonl")
    ok(_run(cmd))
    last = metrics(tmp_path / "dpo")[-1]
    assert last["eval_rewards/accuracy"] == 1.0 and last["eval_pairs"] == 5 and last["eval_loss"] < 0.5


# ---- fast checks without processes -------------------------------------------------------------
def test_lockstep_padding_gives_every_rank_as_many_batches():
    for n in range(1, 12):
        for world in (1, 2, 3, 4):
            for bs in (1, 2, 3):
                counts = [-(-len(range(r, n, world)) // bs) + lockstep_padding(n, bs, r, world) for r in range(world)]
                assert len(set(counts)) == 1 and counts[0] == -(-len(range(0, n, world)) // bs)


def test_streamed_export_cuts_files_and_weights_reads_them(tmp_path):
    from qwen2audio.weights import shard_files

    writer = ShardWriter(tmp_path, limit=1000)
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(7)}  # 400 B each: 2 per file
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert [f.name for f in files] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert writer.peak == 800
    assert shard_files(tmp_path) == files
    read = {k: v for f in files for k, v in load_file(f).items()}
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)


def test_memory_plan_for_7b_shards_the_state_and_warns_by_the_same_formula():
    full = memory.Shape.of(memory.seven_b(lora=False))
    lora = memory.Shape.of(memory.seven_b(lora=True))
    assert 8.3e9 < full.trainable + full.frozen_whole < 8.5e9  # Qwen2-Audio-7B: 8.4 B parameters
    assert lora.trainable < 0.01 * full.trainable
    one, eight = (memory.plan(full, n, 2048) for n in (1, 8))
    for row in ("grads", "optimizer"):
        assert eight[row] == one[row] // 8
    assert one["device"] > 80 * memory.GIB > eight["device"]  # no single 80 GB GPU; eight of them do
    offload = memory.plan(full, 1, 2048, offload=True)
    assert offload["device"] < 20 * memory.GIB and offload["host"] > 100 * memory.GIB
    table = memory.table()
    assert f"| full FT | 8 | " in table and f"**{memory.gib(eight['device'] + memory.GPU_OVERHEAD)}**" in table


def test_sharded_resume_needs_the_same_global_batch(runs, data, tmp_path):
    ok(runs["straight"].result())
    shutil.copytree(runs["root"] / "straight" / "checkpoints", tmp_path / "out" / "checkpoints")
    cfg = TrainConfig(model=data["base"], data=data["sft"], output=str(tmp_path / "out"), max_steps=STEPS, lr=2e-3,
                      warmup_steps=2, batch_size=1, progress=False, device="cpu", resume="latest")
    with pytest.raises(TrainConfigError, match=r"global batch was 1 x 1 x 2 process\(es\) = 2 sequences, now 1 x 1 x 1 = 1"):
        train(cfg)
