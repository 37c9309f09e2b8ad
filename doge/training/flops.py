"""Model FLOPs per token and device peak FLOP/s: the one definition of MFU for the trainer and
every benchmark.

MFU = tokens/s x flops_per_token / peak. Training FLOPs per token count the matmuls a token
actually goes through, forward and backward (x 6 = 2 for a multiply-add x 3 for forward + the two
backward matmuls):
- every linear layer (q, k, v, o, dt_proj, the SwiGLU MLP, the CDMoE router), the LM head even when
  tied to the embedding; not the embedding lookup (a gather, no FLOPs);
- CDMoE: only the `num_experts_per_tok` expert rows a token uses (2 dot products of `hidden`
  each), not the whole tables;
- attention scores and values: 12 x layers x (heads x head_dim) x the mean number of keys a
  query attends to, which is (s + 1) / 2 under the causal mask (so 6·L·h·s for s tokens) and at
  most `keep_window_size` per query beyond the window.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

# Dense bf16 tensor-core peaks (FLOP/s, datasheet) by device-name fragment; first match wins.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
                 "RTX 4090": 165e12, "V100": 125e12}
PEAK_ENV = "DOGE_PEAK_FLOPS"


def mean_keys_per_query(seq_len: int, window: int) -> float:
    """Mean over positions t = 1..seq_len of min(t, window): keys a query attends to."""
    if seq_len <= window:
        return (seq_len + 1) / 2
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def matmul_params_per_token(config) -> int:
    """Weights one token multiplies with (see module docstring)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention = hidden * q_dim + 2 * hidden * kv_dim + kv_dim * config.num_key_value_heads + q_dim * hidden
    mlp = 3 * hidden * config.intermediate_size
    if config.is_moe:
        mlp += hidden * 2 * math.isqrt(config.num_experts) + 2 * hidden * config.num_experts_per_tok
    return layers * (attention + mlp) + hidden * config.vocab_size


def flops_per_token(config, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token of a Doge model at `seq_len`."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    keys = mean_keys_per_query(seq_len, config.keep_window_size)
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * keys
    return 6 * matmul_params_per_token(config) + attention


def _cpu_peak_per_rank(bf16: bool, local_world: int) -> float:
    """Estimated CPU peak: cores * clock * FLOP/cycle (2 FMA units; AVX-512 or AVX2; x2 with bf16 dot)."""
    flags, mhz = "", 2000.0
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next(line for line in info.splitlines() if line.startswith("flags"))
        mhz = float(next(line for line in info.splitlines() if line.startswith("cpu MHz")).split(":")[1])
    except (OSError, StopIteration, ValueError):
        pass
    per_cycle = 64 if " avx512f" in flags else 32
    if bf16 and (" avx512_bf16" in flags or " amx_bf16" in flags):
        per_cycle *= 2
    cores = len(os.sched_getaffinity(0)) / max(1, local_world)
    return cores * mhz * 1e6 * per_cycle


def device_peak_flops(bf16: bool, local_world: int = 1) -> float:
    """Peak FLOP/s of the device one rank uses; DOGE_PEAK_FLOPS overrides the table/estimate
    (e.g. with a measured GEMM rate)."""
    import torch

    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), 100e12)
        return peak if bf16 else peak / 2
    return _cpu_peak_per_rank(bf16, local_world)
