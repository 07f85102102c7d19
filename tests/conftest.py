import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import save_reference_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(directory, reference model, tokenizer) for the 'base' tiny variant, built once per session."""
    directory = tmp_path_factory.mktemp("tiny_base")
    model, tok = save_reference_checkpoint(directory, "base")
    return directory, model, tok
