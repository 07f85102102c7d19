"""Imports run one way, down the layers (DESIGN.md, issue 21): the engine and the model know nothing of api.py,
and weights.py is tensor I/O that knows no model class."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qwen2audio"


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module a file imports, at the top or inside functions."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # `from . import api`
    return names


def fresh_import(code: str) -> None:
    """Run in a new interpreter: other tests' imports would hide what an import pulls in."""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent, timeout=300)


def test_importing_the_engine_does_not_import_the_api():
    fresh_import("import sys, qwen2audio.engine, qwen2audio.engine.llm_engine\n"
                 "assert 'qwen2audio.engine.llm_engine' in sys.modules\n"
                 "assert 'qwen2audio.api' not in sys.modules, 'qwen2audio.engine imported qwen2audio.api'\n"
                 # the package keeps offering load and Pipeline, from api.py on first use
                 "import qwen2audio\nfrom qwen2audio import Pipeline, load\n"
                 "assert qwen2audio.load is load and callable(load) and Pipeline.__name__ == 'Pipeline'\n"
                 "import qwen2audio.api\nassert qwen2audio.api.load is load")


def test_no_module_under_engine_or_model_imports_the_api_even_lazily():
    files = sorted((PACKAGE / "engine").glob("*.py")) + sorted((PACKAGE / "model").glob("*.py"))
    assert len(files) > 8
    offenders = {f.name: sorted(m for m in imported_modules(f) if m.startswith("qwen2audio.api"))
                 for f in files}
    assert not {k: v for k, v in offenders.items() if v}
    weights = imported_modules(PACKAGE / "weights.py")
    assert not [m for m in weights if m.startswith("qwen2audio.model")], weights
    assert "qwen2audio.weights" in imported_modules(PACKAGE / "model" / "qwen2_audio.py")  # the one direction


def test_the_default_model_resolution_imports_nothing_above_it():
    """load(None), the CLI and eval call bundle/assemble.py's default_model(): it (and the parts it reads) must not
    import the surfaces back (api, cli, server, eval, train)."""
    above = ("qwen2audio.api", "qwen2audio.cli", "qwen2audio.server", "qwen2audio.eval", "qwen2audio.train")
    for name in ("assemble.py", "parts.py", "__init__.py"):
        imported = imported_modules(PACKAGE / "bundle" / name)
        assert not [m for m in imported if m.startswith(above)], (name, imported)
