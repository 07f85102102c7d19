"""The shipped model (qwen2audio/assets/model): fp16 safetensors under 100 MB with a model card, the
default wherever no model is given, and it answers the bundled example clips correctly in both modes.

The example clips are held-out items of the project's corpus (never trained on); examples.json holds
each clip's question (none: voice chat) and its true answer from the corpus labels."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

import qwen2audio
from qwen2audio import api, cli

EXAMPLES = Path(qwen2audio.__file__).parent / "assets" / "examples"


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return json.loads((EXAMPLES / "examples.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pipe():
    return qwen2audio.load(device="cpu", progress=False)  # no path: the bundled model


def turn(example: dict) -> list[dict]:
    content = [{"type": "audio", "audio": str(EXAMPLES / example["audio"])}]
    if example["prompt"]:
        content.append({"type": "text", "text": example["prompt"]})
    return [{"role": "user", "content": content}]


def test_shipped_files_are_fp16_safetensors_under_100_mb_with_a_card():
    directory = api.bundled_model_dir()
    assert directory is not None, "qwen2audio/assets/model is missing"
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "chat_template.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in directory.iterdir()) < 100 * 2**20
    with safe_open(directory / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    card = (directory / "README.md").read_text(encoding="utf-8")
    for section in ("## Data", "## Training", "## Measured quality", "## Licence"):
        assert section in card


def test_both_modes_are_among_the_examples(examples):
    assert {bool(e["prompt"]) for e in examples} == {True, False}  # audio analysis and voice chat
    assert all((EXAMPLES / e["audio"]).is_file() for e in examples)


def test_answers_every_example_correctly(pipe, examples):
    for example in examples:
        assert pipe.chat(turn(example)) == example["answer"], example["audio"]


def test_cli_answers_without_model_option(examples, capsys):
    for example in examples:
        argv = ["ask", str(EXAMPLES / example["audio"]), "--device", "cpu"]
        if example["prompt"]:
            argv += ["--prompt", example["prompt"]]
        assert cli.main(argv) == 0
        assert capsys.readouterr().out.strip() == example["answer"]


def test_readme_run_command_asks_the_bundled_examples(examples):
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    run = next(line for line in readme.splitlines() if line.startswith("bash scripts/setup.sh && .venv/bin/qwen2audio"))
    assert "--model" not in run  # the bundled model answers
    for example in examples:
        ask = f".venv/bin/qwen2audio ask qwen2audio/assets/examples/{example['audio']}"
        assert ask + (f' --prompt "{example["prompt"]}"' if example["prompt"] else "") in run
