"""Rotary position embeddings, with the dynamic-NTK scaling the published Doge configs use.

Frequencies are computed on the fly (a few hundred numbers) instead of kept in a buffer, so the
module holds no state: a model built on the meta device or loaded by `from_pretrained` needs no
re-initialisation, and dynamic scaling depends only on the current sequence length.
"""
from __future__ import annotations

import torch
from torch import nn


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DogeRotaryEmbedding(nn.Module):
    """cos/sin tables for `position_ids`; rope_type "default" or "dynamic" (NTK-aware)."""

    def __init__(self, config):
        super().__init__()
        params = config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.rope_type = params.get("rope_type", "default")
        if self.rope_type not in ("default", "dynamic"):
            raise ValueError(f"rope_parameters.rope_type={self.rope_type!r} is not supported; "
                             "use 'default' or 'dynamic'")
        self.theta = float(params["rope_theta"])
        self.factor = float(params.get("factor", 1.0))
        self.dim = head_dim_of(config)
        self.max_positions = config.max_position_embeddings

    def inv_freq(self, seq_len: int, device) -> torch.Tensor:
        """Inverse frequencies; dynamic NTK grows the base once seq_len passes max positions."""
        base = self.theta
        if self.rope_type == "dynamic" and seq_len > self.max_positions:
            scale = self.factor * seq_len / self.max_positions - (self.factor - 1)
            base = base * scale ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
        return 1.0 / (base ** exponents)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        seq_len = int(position_ids.max()) + 1 if self.rope_type == "dynamic" else 0
        freqs = position_ids[..., None].float() * self.inv_freq(seq_len, position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, L, D) states by (B, L, D) tables."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
