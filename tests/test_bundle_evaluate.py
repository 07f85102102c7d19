"""The default model's held-out report (qwen2audio/bundle/evaluate.py) on a tiny corpus built here.

Scores are checked where the answer is known: systems that answer with the references score WER 0 and
accuracy 1, systems that answer garbage score WER > 0 and accuracy 0, and the keys of every question the corpus
can ask are satisfied by the corpus's own answer. A tiny random checkpoint runs the real path through
qwen2audio.load(); the real Whisper base (CTranslate2, installed by scripts/setup.sh) transcribes a clear clip.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from qwen2audio.audio import load_audio
from qwen2audio.bundle import evaluate as ev
from qwen2audio.eval.metrics import key_accuracy
from qwen2audio.synth import build_corpus, questions

SIZE = "asterisk=5,open=1,chat=4,sound=1,music=1"  # item 0 of each synthetic kind and 1 clip per language held out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "corpus"
    build_corpus(root, size=SIZE, seed=0, jobs=2, progress=False)
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("open-qa")


def _key(wav) -> bytes:
    return np.asarray(wav, dtype=np.float32).tobytes()


class Oracle:
    """Answers every clip with its reference (looked up by the audio's samples); garbage=True answers nonsense."""

    max_new_tokens = ev.MAX_NEW_TOKENS
    chat_max_new_tokens = ev.CHAT_MAX_NEW_TOKENS

    def __init__(self, clips: dict, garbage: bool = False):
        self.by_audio = {_key(load_audio(c.audio)): c for cs in clips.values() for c in cs}
        self.by_text = {c.text: c for cs in clips.values() for c in cs if c.text}
        self.garbage = garbage
        self.calls = []

    def _answer(self, clip) -> str:
        if self.garbage:
            return "zqx vbnm"
        gt = clip.gt
        return f"The answer is {gt[0]}." if isinstance(gt, list) else gt

    def raw(self, prompts, wavs, max_new_tokens=None):
        self.calls.append(("raw", len(wavs)))
        assert all("<|AUDIO|>" in p for p in prompts)
        return [self._answer(self.by_audio[_key(w)]) for w in wavs]

    def voice(self, wavs):
        self.calls.append(("voice", len(wavs)))
        return [self._answer(self.by_audio[_key(w)]) for w in wavs]

    def typed(self, texts):
        self.calls.append(("typed", len(texts)))
        return [self._answer(self.by_text[t]) if t in self.by_text else "no idea" for t in texts]


class EchoWhisper:
    """A 'Whisper' that hears exactly what was said (the spoken text, or the transcript)."""

    def __init__(self, clips: dict):
        self.by_audio = {_key(load_audio(c.audio)): c for cs in clips.values() for c in cs}

    def transcribe(self, wavs, languages, max_new_tokens=96):
        out = []
        for w in wavs:
            clip = self.by_audio[_key(w)]
            out.append(clip.text or clip.gt)
        return out


@pytest.fixture(scope="module")
def clips(corpus, work):
    return ev.section_clips(corpus, work, 1)[0]


def test_sections_hold_heldout_clips_of_each_kind(corpus, work, clips):
    items = {str(corpus / it["audio"]): it for it in map(json.loads, (corpus / "items.jsonl").open())}
    assert sorted(c.source for c in clips["asr_real"]) == [f"asterisk_{lang}" for lang in ("en", "es", "fr", "it", "ru")]
    assert [c.source for c in clips["asr_open"]] == ["open_en"]
    for name in ("asr_real", "asr_open", "sound", "instrument"):
        assert clips[name] and all(items[c.audio]["split"] == "heldout" for c in clips[name]), name
    chat = clips["voice_chat"]
    corpus_qs = [c for c in chat if c.source.startswith("corpus_")]
    open_qs = [c for c in chat if c.source.startswith("open_")]
    assert corpus_qs and all(items[c.audio]["split"] == "heldout" for c in corpus_qs)
    # --limit 1: one corpus question and one open question (spoken into WORK)
    assert len(corpus_qs) == 1 and len(open_qs) == 1 and open_qs[0].source == "open_arithmetic"
    assert all(load_audio(c.audio).size > 16000 for c in open_qs)


def test_oracle_scores_perfectly_and_garbage_scores_nothing(corpus, work, clips):
    good = ev.evaluate(Oracle(clips), corpus, work, whisper=EchoWhisper(clips), limit=1, baselines=True,
                       batch_size=2, progress=False, log=lambda m: None)
    bad = ev.evaluate(Oracle(clips, garbage=True), corpus, work, whisper=EchoWhisper(clips), limit=1, baselines=True,
                      batch_size=2, progress=False, log=lambda m: None)
    s = good["sections"]
    assert set(s) == set(ev.SECTIONS)
    real = s["asr_real"]["systems"]
    assert real["model"]["asterisk_en"]["value"] == 0 and real["model"]["pooled_wer"]["value"] == 0
    assert real["model"]["pooled_wer"]["n"] == 5 and real["model"]["pooled_wer"]["ref_units"] > 0
    assert real["whisper"]["pooled_wer"]["value"] == 0  # the echo hears the transcript
    assert s["asr_open"]["systems"]["model"]["open_en"]["value"] == 0
    for name in ("sound", "instrument"):
        assert s[name]["systems"]["model"]["all"]["value"] == 1.0
        assert 0 < s[name]["systems"]["chance"]["all"]["value"] < 0.5
    chat = s["voice_chat"]["systems"]
    assert chat["model"]["all"]["value"] == 1.0 and chat["typed"]["all"]["value"] == 1.0
    assert chat["cascade"]["all"]["value"] == 1.0  # the echo's transcript is the question: typed == cascade
    assert chat["model"]["all"]["n"] == s["voice_chat"]["n"] == len(clips["voice_chat"])

    b = bad["sections"]
    assert b["asr_real"]["systems"]["model"]["pooled_wer"]["value"] >= 1.0  # every word wrong, plus insertions
    assert 0 < b["asr_open"]["systems"]["model"]["open_en"]["value"]
    assert b["sound"]["systems"]["model"]["all"]["value"] == 0.0
    assert b["voice_chat"]["systems"]["model"]["all"]["value"] == 0.0
    assert b["voice_chat"]["systems"]["typed"]["all"]["value"] == 0.0
    # every answer is kept beside its clip
    answers = b["asr_real"]["answers"]
    assert len(answers) == 5 and all(a["model"] == "zqx vbnm" and a["whisper"] for a in answers)


def test_a_wrong_word_costs_its_share_of_the_words(corpus, work, clips):
    class OneWrong(Oracle):
        def raw(self, prompts, wavs, max_new_tokens=None):
            return ["zqx " + " ".join(a.split()[1:]) for a in super().raw(prompts, wavs, max_new_tokens)]

    report = ev.evaluate(OneWrong(clips), corpus, work, limit=1, sections=("asr_open",), progress=False,
                         log=lambda m: None)
    with pytest.raises(ev.EvaluateError, match="Whisper"):
        ev.evaluate(OneWrong(clips), corpus, work, limit=1, sections=("asr_open",), baselines=True)
    m = report["sections"]["asr_open"]["systems"]["model"]["open_en"]
    assert m["errors"] == 1 and m["value"] == pytest.approx(1 / m["ref_units"])


def test_every_question_the_corpus_asks_has_keys_its_own_answer_satisfies():
    asked = questions.every_question()
    for q in [q for q in asked if q["kind"] != "greeting"] + [questions.repeat(np.random.default_rng(3))]:
        keys = ev.question_keys(q)
        assert keys, q
        assert key_accuracy([keys], [q["answer"]])["correct"] == 1, (q, keys)
    assert all(ev.question_keys(q) is None for q in asked if q["kind"] == "greeting")
    # a wrong number or capital is not counted as right
    q = next(q for q in asked if q["kind"] == "arithmetic" and q["result"] == 16)
    assert key_accuracy([ev.question_keys(q)], ["It is 61."])["correct"] == 0
    assert key_accuracy([ev.question_keys(q)], ["Sixteen."])["correct"] == 1


def test_limit_spreads_over_each_source():
    clips = [ev.Clip(f"a{i}", "x" if i < 10 else "y", "") for i in range(13)]
    kept = ev.limit_per_source(clips, 2)
    assert [c.audio for c in kept] == ["a0", "a5", "a10", "a11"]
    assert ev.limit_per_source(clips, None) == clips
    assert [c.audio for c in ev.limit_balanced(clips, 4)] == ["a0", "a1", "a10", "a11"]  # the sources in turn
    assert [c.audio for c in ev.limit_balanced(clips, 9)] == ["a0", "a1", "a2", "a3", "a4", "a5", "a10", "a11", "a12"]
    assert ev.limit_balanced(clips, 20) == clips


def test_table_and_card_block(tmp_path, corpus, work, clips):
    report = ev.evaluate(Oracle(clips), corpus, work, whisper=EchoWhisper(clips), limit=1, baselines=True,
                         progress=False, log=lambda m: None)
    report.update(model_name="tiny", date="2026-01-01", command="python -m qwen2audio.bundle.evaluate --limit 1")
    table = ev.render_markdown(report)
    assert "| task (held-out clips) | clips | metric | tiny | baselines, same clips |" in table
    rows = {row[0]: row for row in ev.table_rows(report)}
    assert rows["ASR, real recordings (Asterisk), English"][3] == "0.0"
    assert rows["ASR, real recordings (Asterisk), 5 languages pooled"][1] == "5"
    assert "Whisper base 0.0" in rows["ASR, open-vocabulary English sentences (TTS)"][4]
    assert rows["Sound events (label)"][3] == "100.0" and "chance" in rows["Sound events (label)"][4]
    assert "typed 100.0" in rows["Voice chat, open questions (openqa.py)"][4]
    card = tmp_path / "README.md"
    card.write_text(f"# card\n\n## Status\n\ntext\n\n{ev.CARD_START}\nold\n{ev.CARD_END}\n\nafter\n")
    ev.update_card(card, table)
    text = card.read_text()
    assert "old" not in text and table.strip() in text and text.startswith("# card") and text.endswith("after\n")
    ev.update_card(card, "second")  # rewriting again replaces the block, nothing else
    assert text.split(ev.CARD_START)[0] == card.read_text().split(ev.CARD_START)[0]
    assert card.read_text().count("second") == 1 and table.strip() not in card.read_text()
    card.write_text("no markers\n")
    with pytest.raises(ev.EvaluateError, match="no <!-- evaluation:start -->"):
        ev.update_card(card, table)


def test_the_default_model_card_has_the_block():
    from qwen2audio.bundle.assemble import CARD_FILE

    text = CARD_FILE.read_text()
    assert text.index("## Status") < text.index(ev.CARD_START) < text.index(ev.CARD_END)


def test_command_runs_a_real_model_and_writes_json(tmp_path, corpus, work, tiny_checkpoint, capsys):
    directory = tiny_checkpoint[0]
    out = tmp_path / "report.json"
    rc = ev.main(["--model", str(directory), "--corpus", str(corpus), "--work", str(work), "--limit", "1",
                  "--max-new-tokens", "4", "--chat-max-new-tokens", "4", "--json", str(out), "--no-progress",
                  "--threads", "1"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["model"] == str(directory) and report["model_name"] == directory.name
    assert report["command"].startswith("python -m qwen2audio.bundle.evaluate --model")
    s = report["sections"]
    assert s["asr_real"]["systems"]["model"]["pooled_wer"]["n"] == 5
    assert s["asr_real"]["systems"]["model"]["pooled_wer"]["value"] > 0  # random weights: no transcript
    assert "whisper" not in s["asr_real"]["systems"]  # no --baselines
    assert s["voice_chat"]["systems"]["model"]["all"]["n"] == len(s["voice_chat"]["answers"]) == 2
    assert all(isinstance(a["model"], str) for a in s["voice_chat"]["answers"])
    printed = capsys.readouterr().out
    assert f"| {directory.name} |" in printed and "Voice chat" in printed


def test_missing_corpus_or_model_is_one_line(tmp_path, corpus, capsys):
    assert ev.main(["--corpus", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "no corpus at" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert ev.main(["--corpus", str(corpus), "--model", str(tmp_path / "nomodel")]) == 2
    err = capsys.readouterr().err
    assert "no such directory" in err and len(err.strip().splitlines()) == 1
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(corpus / "items.jsonl", half)
    assert ev.main(["--corpus", str(half)]) == 2
    assert "eval_asr_real.jsonl" in capsys.readouterr().err
    assert ev.main(["--corpus", str(corpus), "--sections", "asr,sound"]) == 2
    assert "unknown asr" in capsys.readouterr().err


def test_cli_subcommand_help_is_the_same_command(capsys):
    from qwen2audio.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--corpus", "--limit", "--baselines", "--threads", "--json", "--card", "--no-progress"):
        assert flag in text


def test_real_whisper_base_transcribes_clear_speech(tmp_path):
    """The real Whisper base through CTranslate2 on our own 80-bin features: a clean TTS sentence is heard."""
    from qwen2audio.bundle.whisper_asr import WhisperASR
    from qwen2audio.eval.tasks import score_asr
    from qwen2audio.synth import tts

    text = "The weather is nice today and the children are playing in the garden."
    voice = {"engine": "flite", "voice": "slt", "gender": "female", "stretch": 1.0, "f0": 170}
    wav = tts.speak(text, voice)
    sf.write(tmp_path / "x.wav", wav, 16000)
    whisper = WhisperASR(threads=1)
    heard = whisper.transcribe([load_audio(tmp_path / "x.wav")], ["en"], max_new_tokens=40)
    assert "<|" not in heard[0]
    wer = score_asr([{"gt": text, "response": heard[0], "source": "x_en"}])["sources"]["x_en"]["wer"]
    assert wer <= 0.2, heard
