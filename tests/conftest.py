import os
import sys
from pathlib import Path

import pytest

# Nothing may come from a model hub: every checkpoint and tokenizer a test opens is built on disk by the test.
# Set before any test module imports transformers / huggingface_hub, so a stray hub name fails, never downloads.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_reference_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(directory, reference model, tokenizer) for the 'base' tiny variant, built once per session."""
    directory = tmp_path_factory.mktemp("tiny_base")
    model, tok = save_reference_checkpoint(directory, "base")
    return directory, model, tok


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    """The real server (uvicorn in a thread) on 127.0.0.1 over the tiny checkpoint, per test module."""
    from server_harness import start_server

    srv = start_server(tiny_checkpoint[0])
    yield srv
    srv.close()
