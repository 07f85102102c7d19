"""Read CTranslate2 Whisper ``model.bin`` files and convert their encoder to our ``AudioEncoder``.

Pure numpy + struct: no ctranslate2 dependency. The binary layout (little-endian) is::

    u32 binary_version, str spec_name, u32 spec_revision, u32 n_variables,
    n_variables x (str name, u8 rank, u32[rank] shape, u8 dtype, u32 nbytes, bytes[nbytes]),
    [u32 n_aliases, n_aliases x (str alias, str target)]          (binary_version >= 3)

where ``str`` is a u16 byte length (including a trailing NUL) followed by the bytes.
dtype ids: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.

The converted state dict initialises Qwen2-Audio's audio tower from Whisper's encoder. One architectural
difference remains and is intended: Whisper applies ``layer_norm`` right after the transformer layers,
whereas Qwen2-Audio first average-pools time by 2 and then applies ``layer_norm``. Whisper's final
layer norm is copied into ``layer_norm`` as a (good) initialisation; the pooled outputs are therefore
not identical to Whisper's encoder outputs, but everything before the pooling is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import AudioConfig
from ..errors import Qwen2AudioError


class CT2FormatError(Qwen2AudioError):
    """A file that is not a readable CTranslate2 model.bin, or not a Whisper encoder."""


_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16: widened to float32 below
}
_MIN_VERSION, _MAX_VERSION = 3, 6  # versions whose layout is the one above

# Heads of the released Whisper sizes (head_dim is always 64), by d_model.
WHISPER_HEADS = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 20}


@dataclass
class CT2Model:
    """The contents of a model.bin: format version, spec name/revision, variables and aliases."""

    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables


class _Reader:
    def __init__(self, data: memoryview, path: str):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise CT2FormatError(
                f"{self.path}: truncated file: reading {what} needs {n} bytes at offset {self.pos}, "
                f"but the file has {len(self.data)} bytes"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def string(self, what: str) -> str:
        n = self.u16(f"{what} length")
        raw = bytes(self.take(n, what))
        if n == 0 or raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: corrupt string for {what} at offset {self.pos - n} (no NUL terminator)")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CT2FormatError(f"{self.path}: corrupt string for {what} at offset {self.pos - n}") from None


def read_ct2(path: str | Path) -> CT2Model:
    """Read every variable of a CTranslate2 ``model.bin`` (returned as numpy arrays; bf16 widened to f32).

    Raises CT2FormatError for a file that is not a model.bin, an unsupported version, or a truncated file.
    """
    path = Path(path)
    data = memoryview(path.read_bytes())
    r = _Reader(data, str(path))
    version = r.u32("binary version")
    if not _MIN_VERSION <= version <= _MAX_VERSION:
        raise CT2FormatError(
            f"{path}: not a supported CTranslate2 model.bin (binary version {version}; "
            f"supported {_MIN_VERSION}..{_MAX_VERSION})"
        )
    spec = r.string("spec name")
    revision = r.u32("spec revision")
    n_vars = r.u32("variable count")
    variables: dict[str, np.ndarray] = {}
    for i in range(n_vars):
        name = r.string(f"variable {i} name")
        rank = r.u8(f"{name} rank")
        shape = tuple(r.u32(f"{name} shape") for _ in range(rank))
        dtype_id = r.u8(f"{name} dtype")
        if dtype_id not in _DTYPES:
            raise CT2FormatError(f"{path}: variable {name!r} has unknown dtype id {dtype_id}")
        dtype = _DTYPES[dtype_id]
        nbytes = r.u32(f"{name} byte size")
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise CT2FormatError(f"{path}: variable {name!r} has {nbytes} bytes, expected {expected} for shape {shape}")
        arr = np.frombuffer(r.take(nbytes, f"{name} data"), dtype=dtype).reshape(shape)
        if dtype_id == 5:
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = arr.copy()  # own the memory, native byte order
        variables[name] = arr
    aliases: dict[str, str] = {}
    if r.pos < len(data):
        for i in range(r.u32("alias count")):
            alias = r.string(f"alias {i}")
            aliases[alias] = r.string(f"alias {i} target")
    if r.pos != len(data):
        raise CT2FormatError(f"{path}: {len(data) - r.pos} unexpected trailing bytes after offset {r.pos}")
    return CT2Model(version, spec, revision, variables, aliases)


def _get(ct2: CT2Model | dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in ct2:
        raise CT2FormatError(f"missing variable {name!r}: not a CTranslate2 Whisper encoder")
    return np.asarray(ct2[name])


def _heads(ct2, d_model: int) -> int:
    if "encoder/num_heads" in ct2:  # some specs store it as a scalar
        return int(np.asarray(ct2["encoder/num_heads"]).reshape(-1)[0])
    if d_model not in WHISPER_HEADS:
        raise CT2FormatError(f"cannot infer attention heads for d_model={d_model} (known: {sorted(WHISPER_HEADS)})")
    return WHISPER_HEADS[d_model]


def whisper_encoder_state_dict(
    ct2: CT2Model | dict[str, np.ndarray], dtype: torch.dtype = torch.float32
) -> tuple[AudioConfig, dict[str, torch.Tensor]]:
    """Map a CTranslate2 Whisper encoder onto ``AudioEncoder``'s parameter names (= HF ``audio_tower.*``).

    Returns the AudioConfig the weights describe and a state dict that loads with ``strict=True``.
    The fused ``self_attention/linear_0`` (q;k;v stacked on the output dim) is split; its k bias
    (zeros: Whisper's k projection has none) is checked and dropped.
    """
    if "encoder/layer_0/self_attention/linear_0/weight" not in ct2:
        raise CT2FormatError("no 'encoder/layer_0/self_attention/linear_0/weight': not a CTranslate2 Whisper encoder")

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dtype)

    conv1 = _get(ct2, "encoder/conv1/weight")
    d_model, n_mels, _ = conv1.shape
    pos = _get(ct2, "encoder/position_encodings/encodings")
    n_layers = 0
    while f"encoder/layer_{n_layers}/self_attention/linear_0/weight" in ct2:
        n_layers += 1
    ffn = _get(ct2, "encoder/layer_0/ffn/linear_0/weight").shape[0]
    cfg = AudioConfig(
        num_mel_bins=int(n_mels),
        encoder_layers=n_layers,
        encoder_attention_heads=_heads(ct2, int(d_model)),
        encoder_ffn_dim=int(ffn),
        d_model=int(d_model),
        max_source_positions=int(pos.shape[0]),
    )
    if pos.shape != (cfg.max_source_positions, cfg.d_model):
        raise CT2FormatError(f"position encodings have shape {pos.shape}, expected (N, {cfg.d_model})")

    sd: dict[str, torch.Tensor] = {}
    for i in (1, 2):
        sd[f"conv{i}.weight"] = t(_get(ct2, f"encoder/conv{i}/weight"))
        sd[f"conv{i}.bias"] = t(_get(ct2, f"encoder/conv{i}/bias"))
    sd["embed_positions.weight"] = t(pos)

    def norm(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = t(_get(ct2, f"{src}/gamma"))
        sd[f"{dst}.bias"] = t(_get(ct2, f"{src}/beta"))

    def linear(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = t(_get(ct2, f"{src}/weight"))
        sd[f"{dst}.bias"] = t(_get(ct2, f"{src}/bias"))

    d = cfg.d_model
    for i in range(n_layers):
        src, dst = f"encoder/layer_{i}", f"layers.{i}"
        w = _get(ct2, f"{src}/self_attention/linear_0/weight")
        if w.shape != (3 * d, d):
            raise CT2FormatError(f"{src}/self_attention/linear_0/weight has shape {w.shape}, expected {(3 * d, d)}")
        b = _get(ct2, f"{src}/self_attention/linear_0/bias")
        k_bias = b[d : 2 * d].astype(np.float32)
        if np.abs(k_bias).max() > 0:
            raise CT2FormatError(f"{src}: the fused k bias is not zero (max |b| {np.abs(k_bias).max():.3g}): not Whisper")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            sd[f"{dst}.self_attn.{name}.weight"] = t(w[j * d : (j + 1) * d])
            if name != "k_proj":
                sd[f"{dst}.self_attn.{name}.bias"] = t(b[j * d : (j + 1) * d])
        linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
        norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
        linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
        linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
        norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    norm("layer_norm", "encoder/layer_norm")
    return cfg, sd


def load_whisper_encoder(path: str | Path, dtype: torch.dtype = torch.float32):
    """Read a CTranslate2 Whisper model.bin and return (AudioConfig, state dict) for ``AudioEncoder``."""
    return whisper_encoder_state_dict(read_ct2(path), dtype=dtype)
