"""Rotary position embeddings: the default table and every scaling type stock `transformers` offers.

Frequencies are computed on the fly (a few hundred numbers) instead of kept in a buffer, so the
module holds no state: a model built on the meta device or loaded by `from_pretrained` needs no
re-initialisation, and length-dependent types (dynamic NTK, longrope) depend only on the
positions of the current call. The call signature is stock's: `rotary(x, position_ids)` gives
(cos, sin) in x's dtype, scaled by the type's attention factor.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DogeRotaryEmbedding(nn.Module):
    """cos/sin tables for `position_ids`; rope_type "default" or any of transformers' scaled types."""

    def __init__(self, config):
        super().__init__()
        params = config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}
        self.rope_type = params.get("rope_type", "default")
        if self.rope_type != "default" and self.rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"rope_parameters.rope_type={self.rope_type!r} is not supported; use 'default' or one "
                             f"of {', '.join(ROPE_INIT_FUNCTIONS)}")
        self.config = config
        self.theta = float(params["rope_theta"])
        self.factor = float(params.get("factor", 1.0))
        self.dim = head_dim_of(config)
        self.max_positions = config.max_position_embeddings
        self.original_max_positions = params.get("original_max_position_embeddings", self.max_positions)
        self.attention_scaling = 1.0
        if self.rope_type != "default":
            _, self.attention_scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config, "cpu")

    def inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Inverse frequencies. Dynamic NTK grows the base once the positions pass max positions
        (computed from this call's positions); longrope switches to its long factors past the
        original max positions, as stock does."""
        device = position_ids.device
        if self.rope_type in ("default", "dynamic"):
            base = self.theta
            seq_len = int(position_ids.max()) + 1 if self.rope_type == "dynamic" else 0
            if seq_len > self.max_positions:
                scale = self.factor * seq_len / self.max_positions - (self.factor - 1)
                base = base * scale ** (self.dim / (self.dim - 2))
            exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim
            return 1.0 / (base ** exponents)
        seq_len = None
        if self.rope_type == "longrope" and int(position_ids.max()) + 1 > self.original_max_positions:
            seq_len = self.original_max_positions + 1
        return ROPE_INIT_FUNCTIONS[self.rope_type](self.config, device, seq_len=seq_len)[0].float()

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, L, D) states by (B, L, D) tables."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
