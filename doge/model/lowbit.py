"""Reduced-precision weights for CPU decoding: fewer bytes read per token.

Batch-1 decoding reads every weight once per token, so on a CPU its speed is set by weight bytes
over memory bandwidth (doge-20m in float32: 52 MB per token, 34 MB of them the tied LM head).
`packed_linear` keeps a weight in one of three forms, each computing `x @ weight.T` for float32
`x` and returning float32:

- "fp32": the weight as the model holds it (`F.linear`; float32 unless the model was cast).
- "fp16": half the bytes; fbgemm's fp16 GEMM converts the weight to float32 in registers and
  accumulates in float32 (fp16 keeps 3 more mantissa bits than bf16; CPUs without AVX512-BF16 have
  no native bf16 GEMM either, so fp16 is both more accurate and faster here).
- "int8": a quarter of the bytes; symmetric int8 with one scale per output row, the input
  quantised per call to uint8 with its own range (fbgemm dynamic quantisation, int32 accumulation,
  float32 output). The fastest, and the least exact: see the agreement figures in the README.

These are fbgemm kernels (x86 CPUs), so reduced precision is a CPU option.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

WEIGHT_FORMATS = ("fp32", "fp16", "int8")


def packed_linear(weight: torch.Tensor, fmt: str):
    """A function `x -> x @ weight.T` (float32 in and out) with the weight stored as `fmt`."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weights={fmt!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    weight = weight.detach()
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
