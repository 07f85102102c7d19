"""DPO pairs from a model's own mistakes and the preference accuracy (qwen2audio/bundle/preference.py), on the
tiny random checkpoint: its answers are far from any record's, so every conversation becomes a pair."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
import torch

import qwen2audio
from qwen2audio.bundle import preference
from qwen2audio.train.data import Collate, ExampleDataset
from qwen2audio.train.objectives import sequence_logps, split_pairs
from qwen2audio.train.records import load_examples
from tiny import sine

ANSWERS = {"low.wav": "A low hum.", "high.wav": "A high beep.", "mid.wav": "A middle tone."}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    for i, name in enumerate(ANSWERS):
        sf.write(root / name, sine(1.0, 200 * (i + 1), seed=i), 16000)
    records = [{"messages": [{"role": "user", "content": "<audio>What's that sound?"},
                             {"role": "assistant", "content": answer}], "audios": [name]}
               for name, answer in ANSWERS.items()]
    records += [{"task": "asr", "audio": "low.wav", "label": "hello", "language": "en"},  # task records: left out
                {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    path = root / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return qwen2audio.load(tiny_checkpoint[0], device="cpu", progress=False)


def test_a_pair_is_made_only_when_the_answer_is_far_from_the_records():
    record = {"messages": [{"role": "user", "content": "<audio>"},
                           {"role": "assistant", "content": "The capital of France is Paris."}], "audios": ["a.wav"]}
    assert preference.pair_of(record, "the capital of france is paris") is None  # normalised: no error
    sum_record = {**record, "messages": [record["messages"][0], {"role": "assistant", "content": "6 times 10 is 60."}]}
    assert preference.pair_of(sum_record, "Six times ten is 60.") is None  # English numbers normalised
    assert preference.pair_of(record, "The capital of France is Rome.") is None  # 1 of 6 words: under 0.3
    assert preference.pair_of(record, "") is None
    pair = preference.pair_of(record, " I like turtles. ")
    assert pair == {**record, "rejected_response": "I like turtles."}


def test_pairs_resume_load_as_dpo_data_and_accuracy_equals_full_logits(data, pipe, tmp_path):
    out = data.parent / "pairs.jsonl"
    result = preference.build_pairs(pipe, data, out, batch_size=2, max_new_tokens=8, progress=False)
    assert result == {"answered": 3, "pairs": 3}  # the random model's answers are nothing like the records'
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(p["audios"][0] for p in pairs) == sorted(ANSWERS)
    assert all(p["rejected_response"] != p["messages"][1]["content"] for p in pairs)
    # a finished run is not redone; a run stopped after the first batch redoes only the rest
    assert preference.build_pairs(pipe, data, out, batch_size=2, progress=False) == result
    (out.with_name(out.name + ".progress")).write_text(json.dumps({"answered": 2}))
    lines = out.read_text().splitlines()
    out.write_text("".join(line + "\n" for line in lines[:2]))  # the first batch's pairs
    assert preference.build_pairs(pipe, data, out, batch_size=2, max_new_tokens=8, progress=False) == result
    assert out.read_text().splitlines() == lines
    # stopped after writing the second batch's pair, before saving its count: that pair is not written twice
    first = "".join(line + "\n" for line in lines[:2]).encode()
    (out.with_name(out.name + ".progress")).write_text(json.dumps({"answered": 2, "bytes": len(first)}))
    assert preference.build_pairs(pipe, data, out, batch_size=2, max_new_tokens=8, progress=False) == result
    assert out.read_text().splitlines() == lines

    accuracy = preference.preference_accuracy(pipe, out, batch_size=2)
    # the reference: whole-sequence logits of every pair at once
    examples = load_examples(out, "dpo", pipe.tokenizer, 512, log=None).examples
    batch = Collate(pipe.tokenizer.pad_id, pipe.processor.n_mels)([ExampleDataset(examples)[i]
                                                                    for i in range(len(examples))])
    with torch.no_grad():
        logits = pipe.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "input_features",
                                                        "feature_attention_mask")}).logits
    chosen, rejected = split_pairs(sequence_logps(logits, batch["labels"]), batch["n_pairs"])
    assert accuracy["pairs"] == 3
    assert accuracy["accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert accuracy["mean_margin"] == pytest.approx(float((chosen - rejected).mean()), rel=1e-4, abs=1e-3)


def test_cli_names_a_missing_file_in_one_line(capsys):
    assert preference.main(["accuracy", "--pairs", "/nonexistent/pairs.jsonl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "python -m qwen2audio.bundle.preference: error: /nonexistent/pairs.jsonl: no such file"
