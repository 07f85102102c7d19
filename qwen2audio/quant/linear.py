"""Weight-only int8 / int4 linear layers that replace nn.Linear (gpt-fast's quantize.py, by module swap).

    Int8Linear  per output channel:  W[n, k] ~= q[n, k] * scale[n],                 q in [-127, 127]
    Int4Linear  per group of G inputs: W[n, k] ~= (q[n, k] - 8) * scale[g, n] + zero[g, n], q in [0, 15]
                (asymmetric: a group's min maps to q = 0 and its max to q = 15; g = k // G)

Only the weights are low-bit; activations stay floating point. Each layer picks its kernel once, when
it is built, from its device and shape (never per call on a flag):

- CPU: PyTorch's packed kernels `aten._weight_int8pack_mm` / `aten._weight_int4pack_mm_for_cpu` with
  bfloat16 activations (the bf16 variants are the fast ones: with float32 activations the int8 kernel
  is several times slower than a float32 matmul). They read 1 or ~0.6 bytes per weight instead of 4,
  which is what batch-1 decoding is bound by. Their outputs are cast back to the input dtype.
  From `PREFILL_ROWS` rows on (prefill, big batches) the product is compute-bound, and the packed
  kernels are slower than an ordinary matmul there: those rows get the weight dequantised, `CHUNK`
  output rows at a time (a few MB, reused from the allocator instead of page-faulting a whole fresh
  matrix), and an ordinary matmul in `DEQUANT_DTYPE`: bfloat16 where oneDNN has a fast bf16 matmul
  (AVX-512 or AMX: 300 rows of 4864 x 896 take 0.5x the float32 time on an AVX-512 EPYC), float32
  where bf16 is emulated (AVX2: there the packed bf16 kernels took 2.2x the float32 time).
- int8, up to `COMPILED_ROWS` rows on the CPU (batch-1 decoding): a dequantising dot product compiled
  by torch.compile (`int8_dots`): float32 activations times int8 codes converted in registers, one scale
  per row at the end. aten's packed int8 kernel streams weights from memory at a third of the rate
  (4864 x 896 from DRAM, 1 thread of an AVX-512 EPYC: 0.31 ms against 0.79 ms; float32 1.3 ms). It
  needs a C++ compiler (inductor; the first call of each shape compiles for a few seconds and is cached
  on disk); where compiling fails the layer warns once and keeps the packed kernel. Only on AVX-512
  CPUs: on the AVX2 EPYC this project measured earlier, a compiled dequantising GEMV took 5x the float32
  time, and the packed kernel was the fast one.
- anything else (CUDA, shapes a packed kernel refuses): dequantise, then `F.linear` in the input dtype.
  Correct everywhere; not a fast path.

The state dict of a quantised layer holds the *dequantised* weight under `weight` (exactly the values
the kernel multiplies by), so `save_pretrained` on a quantised model writes an ordinary checkpoint that
transformers reads, and quantising those weights again on load gives back the same codes and scales:
identical logits (tests/test_quant.py checks both).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127  # symmetric codes -127..127 (-128 unused, so the scale maps max|w| exactly)
INT4_LEVELS = 15  # codes 0..15
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
KERNEL_DTYPE = torch.bfloat16  # activation dtype of the packed CPU kernels


PREFILL_ROWS = 32  # measured crossover on 2 AVX2 cores: 16 rows packed 4.1 ms vs 4.6; 64 rows 17.0 vs 10.6
DEQUANT_DTYPE = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
COMPILED_ROWS = 4  # int8: rows up to this take the compiled dot product (4 rows of 4864 x 896: 1.2 ms, fp32 2.2)
# The compiled dot product reduces over at most this many inputs at once: longer reductions (the MLP's
# down projection, 4864) get a slower loop from inductor (a cascade sum), so they are split in equal parts
# whose partial sums are added afterwards (896 x 4864: 1.6 ms whole, 0.5 ms in two halves).
MAX_DOT = 2560


@functools.cache
def int8_dots():
    """(x (rows, S, K/S) float32, codes (N, S, K/S) int8, scales (N,) float32) -> x @ W.T (rows, N), compiled
    once per process (dynamic shapes: a few specialisations in all). The sum of the S partial dot products and
    the scaling happen inside the compiled call: as separate eager ops they cost about 25 us per layer, ~4 ms
    of a 0.5B model's decode step."""

    @torch.compile(dynamic=True, fullgraph=True)
    def dots(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return (x[:, None] * codes[None].to(x.dtype)).sum(-1).sum(-1) * scales

    return dots


# false on CPUs without AVX-512, or after a failed compile (no C++ compiler): the packed kernel from then on
_COMPILED = {"ok": torch.backends.cpu.get_cpu_capability() == "AVX512"}


def _dot_split(in_features: int) -> int:
    """The fewest equal parts of at most MAX_DOT inputs."""
    return next(s for s in range(1, in_features + 1) if in_features % s == 0 and in_features // s <= MAX_DOT)
CHUNK = 512  # output rows dequantised at once for the large-row path (a multiple of the int4 packing block)


def _packed_cpu_ok(device: torch.device) -> bool:
    return device.type == "cpu"


# ---- the CPU int4 kernel's packed layout ----------------------------------------------------------
# aten._convert_weight_to_int4pack_for_cpu (aten/src/ATen/native/cpu/int4mm_kernel.cpp) packs rows in
# blocks of BLOCK_N = 4 x the float vector width (32 with AVX2, 64 with AVX-512). For each k, a full block
# stores BLOCK_N / 2 bytes: the low nibbles hold rows 0..BLOCK_N/2-1, the high nibbles the rest; a shorter
# last block (16, 32 or 48 rows) pairs rows (2j, 2j+1) in byte j. We read codes back only to save a
# quantised model; which layout this build uses is checked once against the packer itself, and a machine
# where neither matches gets the dequantising path instead of a wrong answer.
def _unpack_int4(packed: torch.Tensor, N: int, K: int, block: int, dtype=torch.uint8) -> torch.Tensor:
    """Codes (N, K) in `dtype` from packed bytes (written straight into the result: one pass per nibble)."""
    flat = packed.reshape(-1)
    nfull, tail = divmod(N, block)
    out = torch.empty(N, K, dtype=dtype, device=packed.device)
    full = flat[: nfull * block * K // 2].reshape(nfull, K, block // 2).transpose(1, 2)  # (blocks, block/2, K)
    rows = out[: nfull * block].view(nfull, 2, block // 2, K)
    rows[:, 0] = full & 15
    rows[:, 1] = full >> 4
    last = flat[nfull * block * K // 2:].reshape(K, tail // 2).t()  # (tail/2, K): rows 2j and 2j+1
    rest = out[nfull * block:].view(tail // 2, 2, K)
    rest[:, 0] = last & 15
    rest[:, 1] = last >> 4
    return out


_INT4_BLOCK: list = []  # [block size or None], filled on first use


def int4_cpu_block() -> int | None:
    """The packer's BLOCK_N on this machine (checked by round trip), or None when no known layout fits."""
    if not _INT4_BLOCK:
        probe = torch.randint(0, 16, (64 + 48, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
        found = None
        for block in (32, 64):
            if torch.equal(_unpack_int4(packed, *probe.shape, block, torch.int32), probe):
                found = block
                break
        _INT4_BLOCK.append(found)
    return _INT4_BLOCK[0]


def unpack_int4_cpu(packed: torch.Tensor, N: int, K: int, dtype=torch.uint8) -> torch.Tensor:
    """Codes (N, K) from aten._convert_weight_to_int4pack_for_cpu's output."""
    return _unpack_int4(packed, N, K, int4_cpu_block(), dtype)


class QuantLinear(nn.Module):
    """Shared shape handling: (..., in_features) -> (..., out_features) in the input's dtype."""

    kernel: str  # which path forward takes, fixed at construction ("int8pack", "int4pack", "dequant")
    # A row's result depends on how many rows are multiplied together (packed kernels below PREFILL_ROWS): the few
    # new rows after a prefix-cache hit would not compute as a cold prefill does, so the engine turns the prefix
    # cache off for models with such layers (engine/llm_engine.py).
    batch_invariant = False

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.matmul(x.reshape(-1, self.in_features)).to(x.dtype)  # (rows, out)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # (rows, in) -> (rows, out)
        raise NotImplementedError

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The float32 weight (out, in) this layer multiplies by; rows start:stop of it when given."""
        raise NotImplementedError

    def dequantized_matmul(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x @ W.T through `CHUNK`-row slices of the dequantised weight, computed in `dtype`."""
        x = x.to(dtype)
        return torch.cat([F.linear(x, self.dequantize(n, n + CHUNK).to(dtype))
                          for n in range(0, self.out_features, CHUNK)], dim=-1)

    def large_rows_dtype(self, x: torch.Tensor) -> torch.dtype:
        """What a packed layer multiplies `PREFILL_ROWS` or more rows in (see the module's docstring)."""
        return DEQUANT_DTYPE if x.dtype == torch.float32 else x.dtype

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, kernel={self.kernel}"

    # A checkpoint of a quantised model is an ordinary one: the dequantised weight under `weight`.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dequantize()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        self._set_weight(state_dict[key].to(self._device()))
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")

    def _device(self) -> torch.device:
        return next(self.buffers()).device

    def _set_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError


class Int8Linear(QuantLinear):
    """int8 codes (out, in) with one scale per output channel."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.empty(0, dtype=torch.int8, device=weight.device))
        self.register_buffer("scales", torch.empty(0, dtype=KERNEL_DTYPE, device=weight.device))
        # The packed kernel segfaults for in_features not a multiple of 8 (torch 2.13): require 16.
        packed = _packed_cpu_ok(weight.device) and in_features % 16 == 0
        self.kernel = "int8pack" if packed else "dequant"
        self._set_weight(weight)

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float (out, in) -> int8 codes (out, in), bf16 scales (out,). The scale is rounded to bf16 first
        (the kernel's dtype) and the codes computed against the rounded scale."""
        w = weight.detach().float()
        scales = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=1e-12).to(KERNEL_DTYPE)
        codes = torch.round(w / scales.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return codes, scales

    def _set_weight(self, weight: torch.Tensor) -> None:
        self.qweight, self.scales = self.quantize(weight)
        self.register_buffer("scales_f32", self.scales.float(), persistent=False)  # the compiled kernel's

    def _compiled_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        rows, split = x.shape[0], _dot_split(self.in_features)
        try:
            return int8_dots()(x.float().reshape(rows, split, -1), self.qweight.view(self.out_features, split, -1),
                               self.scales_f32)
        except Exception as e:  # inductor could not build its kernel here (no C++ compiler, ...)
            _COMPILED["ok"] = False
            warnings.warn(f"int8: the compiled kernel is not available ({type(e).__name__}: {str(e)[:200]}); "
                          "using aten's packed int8 kernel instead", RuntimeWarning, stacklevel=2)
            return None

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self.qweight[start:stop].float().mul_(self.scales[start:stop].float()[:, None])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int8pack" and x.shape[0] <= COMPILED_ROWS and _COMPILED["ok"]:
            y = self._compiled_matmul(x)
            if y is not None:
                return y
        if self.kernel == "int8pack" and x.shape[0] < PREFILL_ROWS:
            return torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE), self.qweight, self.scales)
        return self.dequantized_matmul(x, self.large_rows_dtype(x) if self.kernel == "int8pack" else x.dtype)


class Int4Linear(QuantLinear):
    """4-bit codes in groups of `group_size` inputs, each group with its own scale and zero point."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32):
        out_features, in_features = weight.shape
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of the int4 group size {group_size}")
        super().__init__(in_features, out_features, bias)
        self.group_size = group_size
        # The CPU packer needs out_features % 16 == 0 (e.g. a tiny vocabulary of 403 is not).
        packed = _packed_cpu_ok(weight.device) and out_features % 16 == 0 and int4_cpu_block() is not None
        self.kernel = "int4pack" if packed else "dequant"
        self.register_buffer("qweight", torch.empty(0, dtype=torch.uint8, device=weight.device))
        self.register_buffer("scales_and_zeros", torch.empty(0, dtype=KERNEL_DTYPE, device=weight.device))
        self._set_weight(weight)

    @staticmethod
    def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float (out, in) -> codes (out, in) int32 in 0..15, scales_and_zeros (in / G, out, 2) bf16.
        Scale and zero are rounded to bf16 first and the codes computed against the rounded values."""
        N, K = weight.shape
        w = weight.detach().float().reshape(N, K // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)  # (N, groups)
        scales = ((hi - lo) / INT4_LEVELS).clamp(min=1e-12).to(KERNEL_DTYPE)
        zeros = (lo + 8 * scales.float()).to(KERNEL_DTYPE)  # the value of code 8
        codes = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None]) + 8
        codes = codes.clamp(0, INT4_LEVELS).to(torch.int32).reshape(N, K)
        scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).contiguous()  # (groups, N, 2)
        return codes, scales_and_zeros

    def _set_weight(self, weight: torch.Tensor) -> None:
        codes, self.scales_and_zeros = self.quantize(weight, self.group_size)
        if self.kernel == "int4pack":
            self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # (N, K / 2) uint8
        else:
            self.qweight = codes.to(torch.uint8)  # unpacked, one code per byte

    def _codes(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        stop = self.out_features if stop is None else min(stop, self.out_features)
        if self.kernel == "dequant":
            return self.qweight[start:stop]
        # Blocks of rows are contiguous in the packed layout: a slice starting on a block boundary unpacks alone.
        assert start % int4_cpu_block() == 0, "int4 rows are read from a packing-block boundary"
        flat = self.qweight.reshape(-1)[start * self.in_features // 2: stop * self.in_features // 2]
        return unpack_int4_cpu(flat, stop - start, self.in_features, torch.float32)

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        w = self._codes(start, stop).float()  # (n, K), a fresh tensor: scaled in place
        n, G = w.shape[0], self.in_features // self.group_size
        sz = self.scales_and_zeros[:, start:start + n].float()  # (G, n, 2)
        scale = sz[..., 0].t()[..., None]  # (n, G, 1)
        offset = (sz[..., 1] - 8 * sz[..., 0]).t()[..., None]  # code 0's value
        return w.view(n, G, self.group_size).mul_(scale).add_(offset).view(n, self.in_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int4pack" and x.shape[0] < PREFILL_ROWS:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE), self.qweight, self.group_size,
                                                              self.scales_and_zeros)
        return self.dequantized_matmul(x, self.large_rows_dtype(x) if self.kernel == "int4pack" else x.dtype)
