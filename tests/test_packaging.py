"""A non-editable install ships every file the package opens next to itself: the web page, the default model's card
and trained weights, the example clips (pyproject's package-data). Built as a real wheel from a copy of the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qwen2audio"


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    pytest.importorskip("setuptools", reason="the wheel is built without build isolation, by the venv's setuptools")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "qwen2audio", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = out.glob("qwen2audio-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def test_wheel_holds_every_file_of_the_package_tree(wheel_names):
    tree = {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    assert tree - wheel_names == set()


def test_wheel_holds_what_the_code_opens(wheel_names):
    from qwen2audio.bundle.assemble import CARD_FILE, TRAINED_DIR
    from qwen2audio.bundle.examples import EXAMPLES, EXAMPLES_DIR, INDEX
    from qwen2audio.server.app import STATIC_DIR

    def name(path: Path) -> str:
        return path.resolve().relative_to(ROOT).as_posix()

    opened = {name(STATIC_DIR / f) for f in ("index.html", "app.js", "style.css", "favicon.svg")}
    opened |= {name(CARD_FILE), name(EXAMPLES_DIR / INDEX)} | {name(EXAMPLES_DIR / e["audio"]) for e in EXAMPLES}
    opened |= {name(p) for p in TRAINED_DIR.iterdir() if p.is_file()}  # trained.safetensors once training exports it
    assert opened - wheel_names == set()
