"""Reduced-precision weights for CPU decoding: fewer bytes read per token.

Batch-1 decoding reads every weight once per token, so on a CPU its speed is set by weight bytes
over memory bandwidth (doge-20m in float32: 52 MB per token, 34 MB of them the tied LM head).
`PackedLinear` keeps a weight in one of three forms, each computing `x @ weight.T` for float32
`x` and returning float32:

- "fp32": the weight as the model holds it (`F.linear`; float32 unless the model was cast).
- "fp16": half the bytes; fbgemm's fp16 GEMM converts the weight to float32 in registers and
  accumulates in float32 (fp16 keeps 3 more mantissa bits than bf16; CPUs without AVX512-BF16 have
  no native bf16 GEMM either, so fp16 is both more accurate and faster here).
- "int8": a quarter of the bytes; symmetric int8 with one scale per output row, the input
  quantised per call to uint8 with its own range (fbgemm dynamic quantisation, int32 accumulation,
  float32 output). The fastest, and the least exact: see the agreement figures in the README.

These are fbgemm kernels (x86 CPUs), so reduced precision is a CPU option. A call costs them
~20 us whatever the size (the input is quantised or converted, the output requantised), about what
a float32 GEMV of 2**19 weights costs on a 2-core Xeon; smaller weights (doge-20m's layer linears,
the o_proj of doge-60m) therefore stay float32 in every format: `stored_format` says which.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

WEIGHT_FORMATS = ("fp32", "fp16", "int8")
BYTES = {"fp16": 2, "int8": 1}
MIN_PACKED = 2**19  # weights with fewer elements stay float32 (see above)


def stored_format(shape: tuple[int, ...], fmt: str) -> str:
    """The format a weight of `shape` is kept in when `fmt` is asked for."""
    return fmt if math.prod(shape) >= MIN_PACKED else "fp32"


class PackedLinear:
    """`x -> x @ weight.T` (float32 in and out) with the weight stored as `stored_format` gives;
    `nbytes` is what one call reads (int8: the weight and a float32 scale per row)."""

    def __init__(self, weight: torch.Tensor, fmt: str):
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"weights={fmt!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
        weight = weight.detach()
        self.format = stored_format(weight.shape, fmt)
        self.nbytes = weight.numel() * (weight.element_size() if self.format == "fp32" else BYTES[self.format])
        self.nbytes += weight.shape[0] * 4 if self.format == "int8" else 0
        self.forward = _kernel(weight, self.format)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


def _kernel(weight: torch.Tensor, fmt: str):
    if fmt == "fp32":
        return lambda x: F.linear(x, weight)
    weight = weight.float()
    if weight.device.type != "cpu":
        raise NotImplementedError(f"weights={fmt!r} uses fbgemm CPU kernels; decode on {weight.device} in fp32")
    if fmt == "fp16":
        packed = torch.ops.quantized.linear_prepack_fp16(weight, None)
        return lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed)
    packed = torch.ops.quantized.linear_prepack(_int8_rows(weight), None)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, False)


def _int8_rows(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8: scale = max |row| / 127 (a zero row gets scale 1)."""
    scales = weight.abs().amax(dim=1).div(127).double()
    scales[scales == 0] = 1.0
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # quantized tensors are deprecated in favour of torchao, still the fbgemm path
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
