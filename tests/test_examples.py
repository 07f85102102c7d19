"""The example clips shipped for the README's main command (qwen2audio/assets/examples): one per mode, small 16 kHz
mono wavs that `python -m qwen2audio.bundle.examples` renders again bit for bit, listed in examples.json."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import soundfile as sf

from qwen2audio.bundle.examples import EXAMPLES, EXAMPLES_DIR, read_index, write_examples

README = Path(__file__).resolve().parent.parent / "README.md"


def test_index_lists_one_clip_per_mode():
    index = read_index()
    assert [e["audio"] for e in index] == [e["audio"] for e in EXAMPLES]
    assert [e["mode"] for e in index] == ["voice chat", "audio analysis"]
    assert [e["keywords"] for e in index] == [["paris"], ["siren"]]
    for example in index:
        assert (example["prompt"] is None) == (example["mode"] == "voice chat")
        assert isinstance(example["answer"], str) and example["answer"].strip(), "answers come from a real run"
        info = sf.info(EXAMPLES_DIR / example["audio"])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 1.0 < info.duration < 6.0 and (EXAMPLES_DIR / example["audio"]).stat().st_size < 200_000


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (scripts/setup.sh installs it)")
def test_clips_render_again_bit_for_bit_and_answers_are_kept(tmp_path):
    shutil.copy(EXAMPLES_DIR / "examples.json", tmp_path / "examples.json")
    index = write_examples(tmp_path)
    assert index == read_index()  # recorded answers kept
    for example in EXAMPLES:
        assert (tmp_path / example["audio"]).read_bytes() == (EXAMPLES_DIR / example["audio"]).read_bytes()
    index = write_examples(tmp_path, {"siren.wav": "A siren."})
    assert [e["answer"] for e in index][1] == "A siren." and read_index(tmp_path) == index


def test_readme_main_command_asks_the_examples_with_the_default_model():
    readme = README.read_text(encoding="utf-8")
    run = next(line for line in readme.splitlines() if line.startswith("bash scripts/setup.sh && .venv/bin/qwen2audio"))
    assert "--model" not in run  # the default model answers
    for example in read_index():
        ask = f".venv/bin/qwen2audio ask qwen2audio/assets/examples/{example['audio']}"
        assert ask + (f' --prompt "{example["prompt"]}"' if example["prompt"] else "") in run
