"""Training data, config, objectives and checkpoint files: fast unit tests (no training runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from tiny import sine, tiny_tokenizer

from qwen2audio.chat import render_chat
from qwen2audio.features import num_audio_tokens, num_valid_frames
from qwen2audio.processor import Qwen2AudioProcessor
from qwen2audio.train import checkpoint as ckpt
from qwen2audio.train.config import TrainConfig, TrainConfigError
from qwen2audio.train.objectives import DPOObjective, dpo_loss, lm_loss_sum, sequence_logps
from qwen2audio.train.pretrain_tasks import (TaskError, examples_from_pairs, make_example, task_record,
                                             task_records_from_pairs)
from qwen2audio.train.records import IGNORE, DataError, load_examples


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    sf.write(root / "a.wav", sine(1.0, 300, seed=1), 16000)
    sf.write(root / "b.wav", sine(0.5, 900, seed=2), 16000)
    sf.write(root / "long.wav", sine(35.0, 500, seed=3), 16000)  # two 30 s windows
    sf.write(root / "tiny.wav", sine(200 / 16000), 16000)  # 200 samples: no audio token
    (root / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    return root


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def chat(user, answer, audios=None, **extra):
    record = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}
    if audios is not None:
        record["audios"] = audios
    return record


def tokens_of(seq, tok, audio_id):
    return sum(1 for t in seq.ids if t == audio_id)


# ---- validation: every bad record as file:line: reason ------------------------------------------
def test_bad_records_are_reported_with_file_line_and_reason(clips, tok, capsys):
    good = chat("<audio>What's that?", "a tone", ["a.wav"])
    lines = [
        good,                                                          # 1 ok
        '{"messages": [',                                              # 2 bad JSON
        "[1, 2]",                                                      # 3 not an object
        {"audios": ["a.wav"]},                                         # 4 no messages
        chat("<audio><audio>Compare.", "same", ["a.wav"]),             # 5 2 tags, 1 audio
        chat("<audio>Hi", "x", ["missing.wav"]),                       # 6 missing file
        chat("<audio>Hi", "x", ["corrupt.wav"]),                       # 7 undecodable
        chat("<audio>Hi", "x", ["tiny.wav"]),                          # 8 too short
        {"messages": [{"role": "user", "content": "<audio>Hi"}], "audios": ["a.wav"]},  # 9 no assistant
        chat("Say <|AUDIO|>", "x"),                                    # 10 reserved token
        {"messages": [{"role": "robot", "content": "hi"}]},            # 11 bad role
        "",                                                            # blank lines are ignored
        chat([{"type": "audio", "audio": "b.wav"}, {"type": "text", "text": "Hi"}], "ok"),  # 13 ok (structured)
    ]
    path = write_jsonl(clips / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_examples(path, "sft", tok, 512)
    problems = err.value.problems
    expected = {
        2: "not valid JSON", 3: "expected a JSON object", 4: "missing 'messages'",
        5: "2 <audio> tag(s) in the messages but 1 file(s) in 'audios'", 6: "file not found",
        7: "cannot decode audio", 8: "too short", 9: "no assistant turn", 10: "reserved token <|AUDIO|>",
        11: "needs a role",
    }
    assert len(problems) == len(expected), problems
    for (line, reason), problem in zip(sorted(expected.items()), problems):
        assert problem.startswith(f"{path}:{line}: "), problem
        assert reason in problem, problem
    assert "10 bad record(s)" in str(err.value) and "\n" not in str(err.value)
    printed = capsys.readouterr().out
    assert all(p in printed for p in problems)  # every bad record is printed, not just the first

    report = load_examples(path, "sft", tok, 512, skip_bad_records=True)
    assert [e.where for e in report.examples] == [f"{path}:1", f"{path}:13"]
    assert "skipped 10 bad record(s)" in capsys.readouterr().out


def test_wrong_role_orders_are_rejected_with_file_line_and_reason(clips, tok):
    def conv(*roles):
        return {"messages": [{"role": r, "content": f"{r} text"} for r in roles]}

    lines = [
        conv("user", "assistant"),                                      # 1 ok
        conv("system", "user", "assistant", "user", "assistant"),       # 2 ok
        conv("assistant", "user", "assistant"),                         # 3 assistant first
        conv("user", "user", "assistant"),                              # 4 two users in a row
        conv("user", "assistant", "assistant"),                         # 5 two assistants in a row
        conv("system", "assistant"),                                    # 6 assistant right after system
        conv("user", "system", "assistant"),                            # 7 system in the middle
        conv("system", "system", "user", "assistant"),                  # 8 two system messages
    ]
    path = write_jsonl(clips / "roles.jsonl", lines)
    report = load_examples(path, "sft", tok, 512, skip_bad_records=True, log=None)
    assert [e.where for e in report.examples] == [f"{path}:1", f"{path}:2"]
    assert report.problems == [
        f"{path}:3: message 0: the conversation must start with a user turn, not assistant",
        f"{path}:4: message 1: two user turns in a row (user and assistant turns must alternate)",
        f"{path}:5: message 2: two assistant turns in a row (user and assistant turns must alternate)",
        f"{path}:6: message 1: the conversation must start with a user turn after the system message, not assistant",
        f"{path}:7: message 1: a system message may only come first",
        f"{path}:8: message 1: a system message may only come first",
    ]
    dpo = write_jsonl(clips / "roles_dpo.jsonl", [{**conv("assistant", "assistant"), "rejected_response": "no"}])
    with pytest.raises(DataError, match=r"roles_dpo.jsonl:1: message 0: the conversation must start with a user turn"):
        load_examples(dpo, "dpo", tok, 512, log=None)


def test_dpo_and_pretrain_records_are_checked(clips, tok):
    dpo = write_jsonl(clips / "dpo.jsonl", [
        chat("<audio>Hi", "good", ["a.wav"], rejected_response="bad"),
        chat("<audio>Hi", "good", ["a.wav"]),
        chat("<audio>Hi", "same", ["a.wav"], rejected_response="same"),
    ])
    report = load_examples(dpo, "dpo", tok, 512, skip_bad_records=True, log=None)
    assert [p.split(": ", 1)[1] for p in report.problems] == [
        "missing 'rejected_response' (needed by --stage dpo)", "'rejected_response' equals the chosen answer"]
    chosen, rejected = report.examples[0].seqs
    assert tok.decode([t for t in chosen.labels if t != IGNORE], False) == "good<|im_end|>"
    assert tok.decode([t for t in rejected.labels if t != IGNORE], False) == "bad<|im_end|>"
    assert chosen.ids[: chosen.labels.index(next(t for t in chosen.labels if t != IGNORE))] == \
        rejected.ids[: rejected.labels.index(next(t for t in rejected.labels if t != IGNORE))]  # same prompt

    pre = write_jsonl(clips / "pre.jsonl", [
        {"task": "asr", "audio": "a.wav", "label": "hello", "language": "en"},
        {"task": "asr", "audio": "a.wav", "label": "hello"},
        {"task": "dance", "audio": "a.wav", "label": "x"},
        {"task": "caption", "audio": "a.wav"},
        {"task": "translation", "audio": "a.wav", "label": "hi", "source_language": "de"},
    ])
    report = load_examples(pre, "pretrain", tok, 512, skip_bad_records=True, log=None)
    reasons = [p.split(": ", 1)[1] for p in report.problems]
    assert reasons[0].startswith("task asr needs 'language'")
    assert reasons[1].startswith("unknown task 'dance'")
    assert reasons[2] == "missing 'label'"
    assert reasons[3].startswith("task translation needs 'source_language' and 'target_language'")
    seq = report.examples[0].seqs[0]
    assert tok.decode([t for t in seq.labels if t != IGNORE], False) == " <|en|>hello<|endoftext|>"


def test_sft_data_may_mix_in_pretraining_task_records(clips, tok):
    task = {"task": "asr", "audio": "a.wav", "label": "hello", "language": "en"}
    mixed = write_jsonl(clips / "mixed.jsonl", [chat("<audio>Hi", "good", ["a.wav"]), task,
                                                {"task": "asr", "audio": "a.wav", "label": "hello"}])
    report = load_examples(mixed, "sft", tok, 512, skip_bad_records=True, log=None)
    assert [p.split(": ", 1)[1] for p in report.problems] == ["task asr needs 'language' (the target starts with its "
                                                              "tag, e.g. <|en|>)"]
    conversation, replay = (ex.seqs[0] for ex in report.examples)
    assert tok.decode([t for t in conversation.labels if t != IGNORE], False) == "good<|im_end|>"
    # the replayed task record is the very sequence --stage pretrain makes of it
    pretrain = load_examples(write_jsonl(clips / "task.jsonl", [task]), "pretrain", tok, 512, log=None)
    assert (replay.ids, replay.labels) == (pretrain.examples[0].seqs[0].ids, pretrain.examples[0].seqs[0].labels)


# ---- tokens and labels -------------------------------------------------------------------------
def test_labels_cover_only_assistant_turns_and_ids_match_the_processor(clips, tok):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<audio>What is it?"},
        {"role": "assistant", "content": "A tone."},
        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "audio", "audio": "b.wav"}]},
        {"role": "assistant", "content": "Another one."},
    ], "audios": ["a.wav"]}
    path = write_jsonl(clips / "multi.jsonl", [record])
    seq = load_examples(path, "sft", tok, 4096).examples[0].seqs[0]
    trained = [t for t in seq.labels if t != IGNORE]
    assert tok.decode(trained, False) == "A tone.<|im_end|>Another one.<|im_end|>"
    # Audio tokens, the system turn and user turns carry no label.
    assert all(lab == IGNORE for t, lab in zip(seq.ids, seq.labels) if t in (tok.audio_id, tok.audio_bos_id))
    # The ids are exactly what the processor makes of the rendered conversation (same audio expansion).
    messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    messages[1]["content"] = [{"type": "audio", "audio": str(clips / "a.wav")}, {"type": "text", "text": "What is it?"}]
    messages[3]["content"][1]["audio"] = str(clips / "b.wav")
    text, sources = render_chat(messages, add_generation_prompt=False)
    proc = Qwen2AudioProcessor(tok)
    expected = proc(text, audio=sources)["input_ids"][0].tolist()
    assert seq.ids == expected
    assert seq.windows == [(str(clips / "a.wav"), 0), (str(clips / "b.wav"), 0)]


def test_long_sequences_are_dropped_or_cut_before_an_audio_block(clips, tok, capsys):
    n_long = [num_audio_tokens(num_valid_frames(n)) for n in (480000, 5 * 16000)]  # 35 s: 750 + 125 tokens
    record = {"messages": [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "<audio>Transcribe."}, {"role": "assistant", "content": "words"},
    ], "audios": ["long.wav"]}
    path = write_jsonl(clips / "long.jsonl", [record])
    full = load_examples(path, "sft", tok, 4096, log=None).examples[0].seqs[0]
    assert tokens_of(full, tok, tok.audio_id) == sum(n_long) and len(full.windows) == 2
    bos = [i for i, t in enumerate(full.ids) if t == tok.audio_bos_id]

    # (drop) longer than max_length: the whole record goes, and the count is printed
    with pytest.raises(DataError, match="no usable records"):
        load_examples(path, "sft", tok, bos[1] + 50, truncation="drop")
    assert "dropped 1 record(s) longer than max_length" in capsys.readouterr().out

    # (cut) inside the second window's block -> cut just before that block's <|audio_bos|>
    cut = load_examples(path, "sft", tok, bos[1] + 50, truncation="cut").examples[0].seqs[0]
    assert len(cut.ids) == bos[1] and cut.windows == full.windows[:1]
    assert tokens_of(cut, tok, tok.audio_id) == n_long[0]
    # (cut) inside the first block -> only the first turn is left, with no audio at all
    cut = load_examples(path, "sft", tok, bos[0] + 10, truncation="cut").examples[0].seqs[0]
    assert len(cut.ids) == bos[0] and cut.windows == [] and tokens_of(cut, tok, tok.audio_id) == 0
    assert tok.decode([t for t in cut.labels if t != IGNORE], False) == "Hi there.<|im_end|>"
    # (cut) leaving no target token at all -> dropped
    with pytest.raises(DataError, match="no usable records"):
        load_examples(path, "sft", tok, 5, truncation="cut", log=None)


# ---- pre-training prompts ----------------------------------------------------------------------
def test_pretrain_task_prompts():
    asr = make_example("asr", "a.wav", "hello world", language="en")
    assert asr["prompt"] == "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech:"
    assert asr["target"] == " <|en|>hello world"
    s2tt = make_example("translation", "b.wav", "Good morning.", source_language="de", target_language="English")
    assert s2tt["prompt"].endswith("Translate the German speech into English:")
    assert make_example("caption", "c.wav", "rain")["prompt"].endswith("Generate the caption in English:")
    assert make_example("emotion", "c.wav", "happy")["prompt"].endswith("Recognize the emotion with keywords in English:")
    assert make_example("vocal_sound", "c.wav", "Cough")["prompt"].endswith(
        "Classify the human vocal sound to VocalSound in English:")
    pairs = examples_from_pairs([("x.wav", "one"), ("y.wav", "two")], "asr", language="zh")
    assert [p["target"] for p in pairs] == [" <|zh|>one", " <|zh|>two"] and pairs[1]["audios"] == ["y.wav"]
    with pytest.raises(TaskError, match="unknown language"):
        make_example("translation", "b.wav", "x", source_language="xx", target_language="en")
    assert task_record("emotion", "c.wav", "sad") == {"task": "emotion", "audio": "c.wav", "label": "sad"}
    records = task_records_from_pairs([("x.wav", "hallo")], "translation", source_language="de", target_language="en")
    assert records == [{"task": "translation", "audio": "x.wav", "label": "hallo", "source_language": "de",
                        "target_language": "en"}]


# ---- config ------------------------------------------------------------------------------------
def test_config_sources_and_precedence(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('stage = "dpo"\nlr = 1\nbatch_size = 4\n[lora]\nr = 16\ntarget_modules = ["q_proj"]\n')
    cfg = TrainConfig.from_sources(str(file), {"batch_size": 2, "model": "m"},
                                   ["lr=3e-4", "lora=true", "lora_target_modules=q_proj,v_proj"])
    assert (cfg.stage, cfg.lr, cfg.batch_size, cfg.lora, cfg.lora_r) == ("dpo", 3e-4, 2, True, 16)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())  # the printed config is a valid config file
    assert TrainConfig.from_sources(str(again)) == cfg
    for bad, message in ((["lr=fast"], "expected a number"), (["nope=1"], "unknown config key"),
                         (["stage=rl"], "choose from"), (["batch_size=0"], "must be >= 1"),
                         (["lora=maybe"], "expected true or false"), (["lr"], "expected key=value")):
        with pytest.raises(TrainConfigError, match=message):
            TrainConfig.from_sources(None, None, bad)
    with pytest.raises(TrainConfigError, match="eval_every needs eval_data"):
        TrainConfig(model="m", data="d", output="o", eval_every=5).validate()
    for example in sorted(Path(__file__).parents[1].glob("examples/train/*.toml")):  # shipped examples parse
        TrainConfig.from_sources(str(example), {"model": "m", "data": "d", "output": "o", "eval_data": "e"}).validate()
    with pytest.raises(TrainConfigError, match="missing model"):
        TrainConfig().validate()
    with pytest.raises(TrainConfigError, match="nothing to train"):
        TrainConfig(freeze_projector=True, freeze_llm=True)


# ---- objectives --------------------------------------------------------------------------------
def test_dpo_loss_matches_hand_computation():
    # policy / reference log-probs of (chosen, rejected) for two pairs
    pc, pr = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # pair 1: 0.5 * ((-1 + 1.5) - (-2 + 1.5)) = 0.5 -> -log(sigmoid(0.5)) = log(1 + e^-0.5)
    # pair 2: 0.5 * ((-3 + 2) - (-1 + 2)) = -1  -> log(1 + e^1)
    assert torch.allclose(out.losses, torch.tensor([math.log(1 + math.exp(-0.5)), math.log(1 + math.e)]))
    assert torch.allclose(out.chosen_rewards, torch.tensor([0.25, -0.5]))
    assert torch.allclose(out.rejected_rewards, torch.tensor([-0.25, 0.5]))
    sums = out.sums()
    assert sums["rewards/accuracy"] == 1.0 and sums["rewards/margins"] == pytest.approx(0.5 - 1.0)

    # sequence log-probs: position t scores label t+1 (row 0 -> token 1: 0.25, row 1 -> token 2: 0.1)
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[IGNORE, 1, 2, IGNORE]])
    assert torch.allclose(sequence_logps(logits, labels), torch.tensor([math.log(0.25) + math.log(0.1)]))
    loss_sum, n = lm_loss_sum(logits, labels)
    assert n == 2 and loss_sum.item() == pytest.approx(-(math.log(0.25) + math.log(0.1)), rel=1e-6)


def test_rpo_adds_the_chosen_answers_mean_token_nll_to_each_pair():
    class FixedLogits(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, **inputs):
            return type("Out", (), {"logits": self.logits})()

    # one pair: the chosen row scores two tokens (0.25, 0.1), the rejected row one (0.6)
    probs = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]],
                          [[0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3]]])
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "n_pairs": 1, "split": "train",
             "labels": torch.tensor([[IGNORE, 1, 2], [IGNORE, 2, IGNORE]]), "index": torch.tensor([0])}
    tables = {"train": torch.tensor([[-3.0, -1.0]])}  # reference log-probs (chosen, rejected)
    model = FixedLogits(torch.log(probs))
    plain, plain_stats = DPOObjective(torch.device("cpu"), beta=0.5, tables=tables)(model, batch)
    rpo, rpo_stats = DPOObjective(torch.device("cpu"), beta=0.5, tables=tables, rpo_alpha=2.0)(model, batch)
    chosen, rejected = math.log(0.25) + math.log(0.1), math.log(0.6)
    expected_dpo = math.log(1 + math.exp(-0.5 * ((chosen + 3.0) - (rejected + 1.0))))
    assert float(plain) == pytest.approx(expected_dpo) and "nll/chosen" not in plain_stats
    assert rpo_stats["nll/chosen"] == pytest.approx(-chosen / 2)  # mean over the chosen answer's two tokens
    assert float(rpo) == pytest.approx(expected_dpo - 2.0 * chosen / 2)
    with pytest.raises(TrainConfigError, match="rpo_alpha"):
        TrainConfig(rpo_alpha=-1.0)


# ---- checkpoint files --------------------------------------------------------------------------
def test_optimizer_state_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = ckpt.optimizer_to_tensors(opt, names)
    path = ckpt.save_checkpoint(tmp_path, 1, dict(model.named_parameters()), tensors, {"optimizer": meta}, keep_last=1)
    loaded = ckpt.load_checkpoint(path)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    ckpt.optimizer_from_tensors(fresh, names, loaded.extra, loaded.state["optimizer"])
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key in a["state"][i]:
            assert torch.equal(a["state"][i][key], b["state"][i][key])
    # keep_last prunes older checkpoints only once the new one is complete
    ckpt.save_checkpoint(tmp_path, 2, dict(model.named_parameters()), tensors, {"optimizer": meta}, keep_last=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000002"]


# ---- LoRA modules and adapter files ------------------------------------------------------------
@pytest.mark.parametrize("layout", ["transformers5", "released"])
def test_lora_adapter_round_trip_and_merge(tmp_path, layout):
    from qwen2audio import Qwen2AudioConfig, Qwen2AudioModel
    from qwen2audio.train.lora import (apply_lora, load_adapter, lora_modules, merge_lora, save_adapter,
                                       select_targets)

    torch.manual_seed(0)
    cfg = Qwen2AudioConfig.from_name("tiny")
    base = Qwen2AudioModel(cfg).eval()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    model = Qwen2AudioModel(cfg).eval()
    model.load_state_dict(state)
    targets = select_targets(model, ["llm", "projector"], ["q_proj", "v_proj", "linear"])
    assert len(targets) == 2 * cfg.text_config.num_hidden_layers + 1  # never the audio tower's q/v_proj
    apply_lora(model, targets, r=4, alpha=8.0)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # B = 0: LoRA starts as the identity
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.5)
        adapted = model(ids).logits
        save_adapter(model, tmp_path, layout=layout)
        fresh = Qwen2AudioModel(cfg).eval()
        fresh.load_state_dict(state)
        torch.testing.assert_close(load_adapter(fresh, tmp_path)(ids).logits, adapted)
        merged = merge_lora(model)
        assert not lora_modules(merged) and set(merged.state_dict()) == set(state)  # plain keys again
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    prefix = "base_model.model.model.language_model." if layout == "transformers5" else \
        "base_model.model.language_model.model."
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert f"{prefix}layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * len(targets)


def test_cli_flags_map_to_config_keys(tmp_path):
    import argparse

    from qwen2audio.train import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    file = tmp_path / "c.toml"
    file.write_text("lr = 0.5\nlora_r = 2\n")
    args = parser.parse_args(["train", "--config", str(file), "--model", "m", "--data", "d", "--output", "o",
                              "--stage", "dpo", "--unfreeze", "audio_tower", "--freeze", "llm", "--lora",
                              "--lora-r", "4", "--lora-target-modules", "q_proj,v_proj", "--bf16", "--resume",
                              "--skip-bad-records", "--set", "beta=0.2"])
    cfg = cli.config_from_args(args).validate()
    assert (cfg.stage, cfg.freeze_audio_tower, cfg.freeze_llm, cfg.lora, cfg.lora_r) == ("dpo", False, True, True, 4)
    assert (cfg.lora_target_modules, cfg.precision, cfg.resume, cfg.beta) == (["q_proj", "v_proj"], "bf16", "latest", 0.2)
    assert cfg.lr == 0.5 and cfg.skip_bad_records  # unset flags leave the file's values alone
    with pytest.raises(ValueError, match="both name llm"):
        cli.config_from_args(parser.parse_args(["train", "--freeze", "llm", "--unfreeze", "llm"]))
