"""Tests of the corpus builder (`qwen2audio synth`) on a tiny corpus.

The Debian tools it drives (espeak-ng, flite, festival, fluidsynth, the soundfont, the Asterisk
prompts) are installed by the project's setup; when one is missing these tests fail with the
package to install rather than skip, since a corpus without them is not the corpus.
"""

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import soundfile as sf

from qwen2audio import load_audio
from qwen2audio.cli import main
from qwen2audio.synth import MissingToolError, SynthError, build_corpus, dsp, music, opentext, plan, questions, sounds, tts
from qwen2audio.synth.asterisk import clips, parse_transcripts
from qwen2audio.synth.build import check_sources
from qwen2audio.synth.evalsets import EVAL_SETS, KNOWN_QUESTIONS, eval_file, known_question_specs
from qwen2audio.synth.render import mixture_parts
from qwen2audio.synth.split import is_heldout, split_of

JSONL_FILES = ("train.jsonl", "heldout.jsonl", "pretrain_train.jsonl", "pretrain_heldout.jsonl",
               "pretrain_raw_train.jsonl", "pretrain_raw_heldout.jsonl", "items.jsonl")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def all_files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "tiny"
    manifest = build_corpus(root, size="tiny", seed=0, jobs=2, progress=False)
    items = {item["id"]: item for item in read_jsonl(root / "items.jsonl")}
    return root, manifest, items


def test_debian_packages_installed():
    # Names the missing package (MissingToolError's message) instead of skipping.
    check_sources(set(plan.SOURCES), {"asterisk": 1, "music": 1}, None)


def test_same_seed_same_files_and_resume(corpus, tmp_path):
    root, manifest, _ = corpus
    other = tmp_path / "again"
    build_corpus(other, size="tiny", seed=0, jobs=1, progress=False)  # other --jobs: same bytes
    first = all_files(root)
    assert all_files(other) == first
    # Resume: finished files are kept, missing ones rendered again, to the same bytes.
    removed = sorted(p for p in first if p.startswith("audio/"))[::9]
    for path in removed:
        (other / path).unlink()
    (other / "train.jsonl").unlink()
    resumed = build_corpus(other, size="tiny", seed=0, jobs=1, progress=False)
    planned = [p for p in removed if not p.startswith("audio/chat_known/")]  # eval-set clips are not plan items
    assert len(planned) < len(removed)
    assert resumed["rendered_now"] == len(planned) and resumed["reused"] == manifest["rendered_now"] - len(planned)
    assert all_files(other) == first
    with pytest.raises(SynthError, match="other settings"):
        build_corpus(other, size="tiny", seed=1, progress=False)


def test_every_record_parses_and_its_audio_decodes(corpus):
    root, manifest, items = corpus
    paths = set()
    for name in JSONL_FILES:
        for row in read_jsonl(root / name):
            paths.update(row.get("audios") or [row.get("audio")])
            if "messages" in row:
                assert [m["role"] for m in row["messages"]][::2] == ["user"] * (len(row["messages"]) // 2)
                assert row["messages"][0]["content"].startswith("<audio>")
                assert all(m["content"].strip() for m in row["messages"] if m["role"] == "assistant")
    by_audio = {item["audio"]: item for item in items.values()}
    assert paths == set(by_audio)
    for rel in sorted(paths):
        info = sf.info(str(root / rel))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), rel
        wav = load_audio(str(root / rel))
        assert dsp.rms(wav) > 1e-3, f"{rel} is silent"
        assert abs(wav.size / 16000 - by_audio[rel]["duration"]) < 1e-3
    counts = {split: sum(s["items"].values()) for split, s in manifest["splits"].items()}
    assert counts["train"] + counts["heldout"] == len(items) == 50
    spoken = [it for it in items.values() if it["kind"] == "open"]  # open-vocabulary fortune sentences
    assert len(spoken) == 8 and all(it["text"] in opentext.sentences(it["language"]) for it in spoken)
    assert all(counts.values())


def test_pretrain_records_are_what_the_trainer_reads(corpus):
    from qwen2audio.train.pretrain_tasks import example_from_record

    root, _, _ = corpus
    tasks = set()
    for split in ("train", "heldout"):
        raw = read_jsonl(root / f"pretrain_raw_{split}.jsonl")
        for record, example in zip(read_jsonl(root / f"pretrain_{split}.jsonl"), raw):
            assert example_from_record(record) == example
            tasks.add(record["task"])
            if record["task"] == "asr":
                assert example["target"] == f" <|{record['language']}|>{record['label']}"
                assert example["prompt"].endswith("Detect the language and recognize the speech:")
    assert {"asr", "caption", "custom"} <= tasks


def content_key(item):
    """What the split is decided by: the sentence, the question's canonical form, the prompt's name."""
    if item["kind"] in ("chat", "mixture"):
        return item["question"]["key"]
    return item.get("split_key") or item.get("text")


def test_heldout_never_overlaps_train(corpus):
    root, _, items = corpus
    by_split = {"train": [], "heldout": []}
    for item in items.values():
        by_split[item["split"]].append(item)
        if item["kind"] in ("speech", "chat", "asterisk", "mixture"):
            assert split_of(content_key(item)) == item["split"], item["id"]  # by content, not by the seed
    for field in (content_key, lambda x: x.get("text"), lambda x: x["audio"]):
        train, heldout = ({field(x) for x in by_split[s]} - {None} for s in ("train", "heldout"))
        assert not train & heldout
    for split in ("train", "heldout"):
        audios = {a for name in (f"{split}.jsonl", f"pretrain_{split}.jsonl")
                  for row in read_jsonl(root / name) for a in row.get("audios") or [row["audio"]]}
        assert audios == {x["audio"] for x in by_split[split]}
    assert {x["kind"] for x in by_split["heldout"]} == set(plan.KINDS)


def test_eval_sets_hold_only_heldout_audio_and_read_as_their_tasks(corpus):
    from qwen2audio.eval.tasks import get_task

    root, manifest, items = corpus
    heldout = {x["audio"]: x for x in items.values() if x["split"] == "heldout"}
    for name, task in EVAL_SETS.items():
        path = eval_file(root, name)
        rows = read_jsonl(path)
        assert manifest["files"][path.name] == len(rows) > 0
        if name != "voice_chat_known":
            assert {r["audio"] for r in rows} <= set(heldout), name
        for it in get_task(task).read(path, None):  # the evaluator reads them, and every audio file exists
            assert it.problem is None and (root / it.fields["audio_path"]).exists()
    kinds = lambda name: {heldout[r["audio"]]["kind"] for r in read_jsonl(eval_file(root, name))}  # noqa: E731
    assert (kinds("asr_synth"), kinds("asr_real"), kinds("sound"), kinds("instrument")) == (
        {"speech"}, {"asterisk"}, {"sound"}, {"music"})
    assert kinds("voice_chat") <= {"chat", "mixture"} and "chat" in kinds("voice_chat")
    for r in read_jsonl(eval_file(root, "analysis")):
        assert r["source"] == f"analysis_{heldout[r['audio']]['kind']}" and r["question"]
    for r in read_jsonl(eval_file(root, "asr_synth")):
        item = heldout[r["audio"]]
        assert (r["gt"], r["source"]) == (item["text"], f"synth_{item['language']}")
        assert r["prompt"].endswith(f"speech: <|{item['language']}|>")
    for r in read_jsonl(eval_file(root, "voice_chat")):
        q = heldout[r["audio"]]["question"]
        assert r["question"] == "" and r["gt"] == q["answer"] and r["source"].startswith(f"spoken_{q['kind']}")
    # Known questions: training-side content in recordings of their own, never in the training files.
    known = read_jsonl(eval_file(root, "voice_chat_known"))
    specs = known_question_specs(len(known), 0, list(plan.TTS_SOURCES))
    assert len(known) == min(KNOWN_QUESTIONS, manifest["settings"]["counts"]["chat"])
    assert [r["audio"] for r in known] == [s["audio"] for s in specs]
    assert all(split_of(s["question"]["key"]) == "train" for s in specs)
    assert [r["gt"] for r in known] == [s["question"]["answer"] for s in specs]
    assert not {r["audio"] for r in known} & {x["audio"] for x in items.values()}
    wav = load_audio(str(root / known[0]["audio"]))
    assert wav.size > 16000 * 0.5  # a real spoken question


def test_asterisk_transcripts():
    text = ("\ufeff; Core Asterisk Sounds in English\n\nbeep: [this is a simple beep tone]\n"
            "letters/at: at [@]\nconfbridge-join: <beep ascending>\nsilence/10: (10 seconds of silence)\n"
            "vm-tempgreetactive: Sus saludos [temporales] estan actualmente en uso\ndir-welcome:\n"
            "agent-pass: Please enter your password followed by the pound key.\n")
    assert parse_transcripts(text) == {
        "letters/at": "at", "vm-tempgreetactive": "Sus saludos estan actualmente en uso",
        "agent-pass": "Please enter your password followed by the pound key."}
    real = {c["name"]: c for c in clips("en")}
    assert "beep" not in real and real["letters/at"]["text"] == "at"
    assert real["agent-pass"]["text"] == "Please enter your password followed by the pound key."
    assert not any(ch in c["text"] for c in real.values() for ch in "[]<>()")
    held = [n for n in real if is_heldout(n)]
    assert 0.05 < len(held) / len(real) < 0.15


def test_generated_sounds_match_their_labels():
    rng = np.random.default_rng(0)
    for freq in (250, 1000, 1870):
        wav = sounds.render({**sounds.sample(rng, "tone"), "freq": freq}, rng)
        assert abs(dsp.dominant_frequency(wav) - freq) < 2
    for n in (2, 5):
        wav = sounds.render({**sounds.sample(rng, "beeps"), "n": n}, rng)
        loud = np.convolve(np.abs(wav) > 0.3, np.ones(80) / 80, mode="same") > 0.5
        assert np.count_nonzero(np.diff(loud.astype(int)) == 1) == n
    for direction in ("rising", "falling"):
        wav = sounds.render({**sounds.sample(rng, "chirp"), "direction": direction}, rng)
        half = wav.size // 2
        rises = dsp.dominant_frequency(wav[half:]) > dsp.dominant_frequency(wav[:half])
        assert rises == (direction == "rising")
    noises = {c: sounds.render({**sounds.sample(rng, f"{c} noise"), "duration": 2.0}, rng) for c in ("white", "brown")}
    low_share = {c: dsp.rms(w - np.convolve(w, np.ones(64) / 64, "same")) / dsp.rms(w) for c, w in noises.items()}
    assert low_share["white"] > 0.9 > 0.2 > low_share["brown"]  # white is mostly highs, brown mostly lows


def test_music_is_in_its_key(corpus):
    root, _, items = corpus
    checked = 0
    for item in items.values():
        for p in [item.get("music")] if item["kind"] == "music" else []:
            if p["instrument"] == "drums":
                continue
            tonic = music.NOTE_NAMES.index(p["key"].rsplit(" ", 1)[0])
            scale = [(tonic + step) % 12 for step in music.SCALES[p["mode"]]]
            chroma = music.chroma(load_audio(str(root / item["audio"])))
            assert chroma[scale].sum() / chroma.sum() > 0.75, item["id"]
            checked += 1
    assert checked


def test_mixtures_hold_the_command_and_the_background(corpus):
    root, _, _ = corpus
    specs = [s for s in plan.make_plan({"mixture": 4}, 0, set(plan.SOURCES)) if s["id"] == "mixture-000001"]
    speech, background = mixture_parts(specs[0], music.find_soundfont())
    written = load_audio(str(root / specs[0]["audio"])).astype(np.float64)
    # The file is gain * (speech + background): both parts are there, at the planned levels.
    (a, b), *_ = np.linalg.lstsq(np.stack([speech, background], axis=1), written, rcond=None)
    assert a > 0 and b > 0 and abs(a / b - 1) < 0.02
    start = dsp.samples(specs[0]["offset"])
    end = start + tts.speak(specs[0]["question"]["question"], specs[0]["voice"]).size
    assert dsp.rms(written[: start]) > 0.01  # the background plays before the command starts
    snr = 20 * np.log10(dsp.rms(speech[start:end]) / dsp.rms(background[start:end]))
    assert abs(snr - specs[0]["snr_db"]) < 0.1


def test_voice_chat_answers_are_correct(corpus):
    words = {questions.number_words(n): n for n in range(21)}
    rng = np.random.default_rng(1)
    for _ in range(300):
        q = questions.arithmetic(rng)
        spoken = q["question"].rstrip("?.").split()
        op = next(w for w in spoken if w in questions.OPERATIONS)
        i = spoken.index(op)
        a, b = words[spoken[i - 1]], words[spoken[i + 1]]
        result = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        assert result >= 0 and q["answer"] == f"{a} {op} {b} is {result}."
    assert questions.spell(np.random.default_rng(0))["answer"].count("-") >= 2
    # In the corpus, spoken questions are answered with their own answer.
    root, _, items = corpus
    by_audio = {item["audio"]: item for item in items.values()}
    voice_chats = 0
    for split in ("train", "heldout"):
        for row in read_jsonl(root / f"{split}.jsonl"):
            if row["messages"][0]["content"] == "<audio>":
                assert row["messages"][1]["content"] == by_audio[row["audios"][0]]["question"]["answer"]
                voice_chats += 1
    assert voice_chats >= 8


def test_heldout_sentences_are_new_combinations_of_training_words():
    from qwen2audio.synth import sentences

    rng = np.random.default_rng(5)
    for language in sentences.TEMPLATES:
        train = {sentences.sentence(rng, language, heldout=False) for _ in range(3000)}
        heldout = {sentences.sentence(rng, language, heldout=True) for _ in range(300)}
        assert not train & heldout and len(train) > 500 and len(heldout) > 50, language
        # Words (characters for Chinese) of a held-out template sentence were all heard in training.
        known = set("".join(train)) if language == "zh" else {w for s in train for w in s.lower().split()}
        made = [s for s in heldout if s not in sentences.BANKS[language]]
        assert len(made) > 0.6 * len(heldout), language
        for s in made:
            units = set(s) if language == "zh" else set(s.lower().split())
            assert units <= known, (language, s, units - known)


def test_every_question_enumerates_what_the_generators_ask():
    every = {(q["question"], q["answer"], q["key"]) for q in questions.every_question()}
    assert len(every) == len(questions.every_question())  # no duplicates
    rng = np.random.default_rng(3)
    drawn = [questions.question(rng, heldout=i % 2 == 0) for i in range(3000)]
    asked = {(q["question"], q["answer"], q["key"]) for q in drawn if q["kind"] != "repeat"}
    assert asked <= every
    assert {q["kind"] for q in drawn} - {"repeat"} == {q["kind"] for q in questions.every_question()}


def test_knowledge_chats_hold_every_training_side_question_and_no_heldout_one(corpus):
    from qwen2audio.synth.knowledge import (KNOWLEDGE_FILE, MIN_RECORDS_PER_KEY, STATEMENT_KINDS, STATEMENT_PROMPTS,
                                            knowledge_records)

    root, manifest, _ = corpus
    rows = read_jsonl(root / KNOWLEDGE_FILE)
    assert rows == knowledge_records(seed=0) and manifest["files"][KNOWLEDGE_FILE] == len(rows)
    answers = {q["question"]: q for q in questions.every_question()}
    stated = {q["answer"]: q for q in answers.values() if q["kind"] in STATEMENT_KINDS}
    seen, statements = Counter(), Counter()
    for row in rows:
        assert set(row) == {"messages"}  # text only: no audios
        (user, assistant) = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        question = user["content"]
        if question.startswith("Repeat after me: "):
            assert assistant["content"] == question.removeprefix("Repeat after me: ")
            assert not is_heldout(f"repeat:{assistant['content']}")
            continue
        if question in STATEMENT_PROMPTS:  # the answer alone, after a prompt that does not name the question
            q = stated[assistant["content"]]
            assert not is_heldout(q["key"])
            statements[q["key"]] += 1
            continue
        q = answers[question]
        assert assistant["content"] == q["answer"] and not is_heldout(q["key"])
        seen[q["key"]] += 1
    train_keys = {q["key"] for q in answers.values() if not is_heldout(q["key"])}
    assert set(seen) == train_keys and min(seen.values()) >= MIN_RECORDS_PER_KEY
    assert set(statements) == {k for k in train_keys if k.split(":")[0] in STATEMENT_KINDS}
    assert all(statements[k] == seen[k] for k in statements)
    assert any(is_heldout(q["key"]) for q in answers.values())  # there were held-out ones to leave out


def test_size_names_a_plan_or_changes_some_kinds_of_one():
    everything = set(plan.SOURCES)
    assert plan.parse_size("medium", everything) == plan.SIZES["medium"]
    assert plan.parse_size("medium,music=4000", everything) == {**plan.SIZES["medium"], "music": 4000}
    assert plan.parse_size("music=5", everything) == {**dict.fromkeys(plan.KINDS, 0), "music": 5}
    assert plan.parse_size("small", {"sounds"})["speech"] == 0  # a named size drops kinds its sources can't make
    with pytest.raises(SynthError, match="nothing to make them from"):
        plan.parse_size("small,speech=10", {"sounds"})


def test_cli_builds_and_reports_errors(tmp_path, capsys, monkeypatch):
    from qwen2audio.synth.cli import SOURCES

    assert SOURCES == plan.SOURCES  # the CLI keeps its own copy so that --help imports nothing heavy
    out = tmp_path / "cli"
    assert main(["synth", "-o", str(out), "--size", "sound=3", "--sources", "sounds", "-q"]) == 0
    assert len(read_jsonl(out / "train.jsonl")) + len(read_jsonl(out / "heldout.jsonl")) == 3
    assert main(["synth", "-o", str(tmp_path / "x"), "--size", "huge", "-q"]) == 2
    assert "unknown kind 'huge'" in capsys.readouterr().err
    assert main(["synth", "-o", str(tmp_path / "x"), "--size", "tiny,music=x", "-q"]) == 2
    assert "'music=x' needs a non-negative count" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng on the PATH
    assert main(["synth", "-o", str(tmp_path / "y"), "--size", "speech=2", "--sources", "espeak", "-q"]) == 2
    assert "apt-get install espeak-ng" in capsys.readouterr().err
    with pytest.raises(MissingToolError, match="fluidsynth"):
        check_sources({"music"}, {"music": 1}, None)
    shutil.rmtree(out)


def test_tts_timeout_is_retried_once_then_reported(tmp_path, monkeypatch):
    # A starved or paused machine can stall one TTS call; a longer second try must rescue the item.
    monkeypatch.setattr(tts, "TIMEOUTS_S", (0.3, 20))
    marker = tmp_path / "tried"
    stall_once = ["sh", "-c", f'[ -e "{marker}" ] && exit 0; touch "{marker}"; exec sleep 30']
    tts._run(stall_once, None, "slow engine")
    assert marker.exists()
    monkeypatch.setattr(tts, "TIMEOUTS_S", (0.2, 0.3))
    with pytest.raises(SynthError, match=r"slow engine did not finish in 0.2 s, then 0.3 s"):
        tts._run(["sleep", "30"], None, "slow engine")


def test_default_model_leg_records_are_those_of_a_build(corpus):
    """A training leg's task records are computed from the plan without rendering, equal to a build's."""
    from qwen2audio.bundle.train_default import task_records

    root, _, _ = corpus
    assert task_records("tiny") == read_jsonl(root / "pretrain_train.jsonl")


def test_a_dpo_leg_on_a_new_machine_first_builds_the_conversations_it_answers(tmp_path, monkeypatch):
    """A DPO leg answers an earlier leg's data, which a fresh corpus lacks: the leg builds it before the pairs."""
    from qwen2audio.bundle import train_default

    monkeypatch.setattr(train_default, "STATE_DIR", tmp_path / "repo")
    monkeypatch.setattr(train_default, "LEGS", {"leg1": ("chat=4", []), "leg9": ("chat=4", [])})
    monkeypatch.setattr(train_default, "DPO_PAIRS", {"leg9": (("leg1.jsonl", 10), ("heldout.jsonl", 4))})
    commands = []
    monkeypatch.setattr(train_default, "_run", commands.append)
    corpus = tmp_path / "work" / "corpus1"
    corpus.mkdir(parents=True)
    train_default.leg_data(tmp_path / "work", "leg9")
    assert read_jsonl(corpus / "leg1.jsonl") == train_default.task_records("chat=4")
    assert [c[c.index("--data") + 1] for c in commands] == [str(corpus / "leg1.jsonl"), str(corpus / "heldout.jsonl")]


def test_default_model_training_state_round_trip(tmp_path, monkeypatch):
    """The repository keeps the latest checkpoint only, with AdamW's moments in bfloat16 (half the bytes); a new
    machine gets it back with float32 moments, the other tensors untouched."""
    import torch
    from safetensors.torch import load_file, save_file

    from qwen2audio.bundle import train_default

    monkeypatch.setattr(train_default, "STATE_DIR", tmp_path / "repo")
    work = tmp_path / "work"
    g = torch.Generator().manual_seed(0)
    optim = {"w::exp_avg": torch.randn(64, 8, generator=g), "w::exp_avg_sq": torch.rand(64, 8, generator=g) * 1e-9,
             "w::step": torch.tensor(50.0), "rng": torch.arange(7, dtype=torch.uint8)}
    for step in (25, 50):
        (work / "runs" / "leg1" / "checkpoints" / f"step-{step:08d}").mkdir(parents=True)
        (work / "runs" / "leg1" / "checkpoints" / f"step-{step:08d}" / "state.json").write_text(str(step))
        save_file(optim, str(work / "runs" / "leg1" / "checkpoints" / f"step-{step:08d}" / "optimizer.safetensors"))
    saved = train_default.save_state(work, "leg1")
    assert [p.name for p in (tmp_path / "repo" / "leg1" / "checkpoints").iterdir()] == ["step-00000050"]
    assert (saved / "state.json").read_text() == "50"
    in_repo = load_file(str(saved / "optimizer.safetensors"))
    assert in_repo["w::exp_avg"].dtype == in_repo["w::exp_avg_sq"].dtype == torch.bfloat16
    assert in_repo["w::step"].dtype == torch.float32 and torch.equal(in_repo["rng"], optim["rng"])
    fresh = tmp_path / "fresh"  # a new machine: the repository's checkpoint comes back into the run
    train_default.restore_state(fresh, "leg1")
    restored = fresh / "runs" / "leg1" / "checkpoints" / "step-00000050"
    assert (restored / "state.json").read_text() == "50"
    back = load_file(str(restored / "optimizer.safetensors"))
    for key in ("w::exp_avg", "w::exp_avg_sq"):  # float32 again, equal to bfloat16 precision (tiny values kept)
        assert back[key].dtype == torch.float32
        torch.testing.assert_close(back[key], optim[key], rtol=8e-3, atol=0)
    assert not list(restored.parent.glob(".tmp-*"))


def test_default_model_exports_stack_every_legs_training():
    """Two legs' LoRA pairs on one layer stack along the rank: merging the stacked pair equals merging the
    earlier leg's, then the later leg's; plain tensors come from the later leg."""
    import torch

    from qwen2audio.bundle.train_default import stack_trained

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=g)
    a1, b1, a2, b2 = (torch.randn(*shape, generator=g) for shape in ((3, 5), (6, 3), (2, 5), (6, 2)))
    earlier = {"m.lora_A.weight": a1, "m.lora_B.weight": b1, "p.weight": torch.zeros(2)}
    later = {"m.lora_A.weight": a2, "m.lora_B.weight": b2, "p.weight": torch.ones(2)}
    stacked = stack_trained(earlier, 2.0, later, 0.5)
    assert stacked["m.lora_A.weight"].shape == (5, 5) and torch.equal(stacked["p.weight"], torch.ones(2))
    one_by_one = weight + 2.0 * b1 @ a1 + 0.5 * b2 @ a2
    torch.testing.assert_close(weight + stacked["m.lora_B.weight"] @ stacked["m.lora_A.weight"], one_by_one)
    only_later = stack_trained({}, 1.0, later, 0.5)
    torch.testing.assert_close(only_later["m.lora_B.weight"], 0.5 * b2)
