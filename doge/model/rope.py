"""Rotary position embeddings: the default table and every scaling type stock `transformers` offers.

Frequencies are computed on the fly in float32 (a few hundred numbers), so the tables never
depend on a buffer that a bf16 cast has rounded, and length-dependent types (dynamic NTK,
longrope) depend only on the positions of the current call. The module still exposes stock's
`inv_freq` and `original_inv_freq` buffers (tools and transformers' own tests read them): they
hold the frequencies of the last call, as stock's do after its in-place updates. The call
signature is stock's: `rotary(x, position_ids)` gives (cos, sin) in x's dtype, scaled by the
type's attention factor.
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
        init_fn = self.compute_default_rope_parameters if self.rope_type == "default" else \
            ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = init_fn(config)  # meta under from_pretrained: refilled by _init_weights
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None, **kwargs) -> tuple[torch.Tensor, float]:
        """The unscaled frequencies and attention factor 1, under the name transformers'
        `_init_weights` looks up to refill the buffers of a model loaded on the meta device."""
        params = config.rope_parameters or {"rope_theta": 10000.0}
        dim = head_dim_of(config)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
        return 1.0 / (float(params["rope_theta"]) ** exponents), 1.0

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
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
        inv_freq = self.frequencies(position_ids)
        if self.rope_type in ("dynamic", "longrope"):  # mirror stock's in-place update of its buffer
            self.inv_freq.copy_(inv_freq)
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, L, D) states by (B, L, D) tables."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) positions that restart at 0 where each document of a packed row starts (a run of equal
    ids): every document is rotated as if it ran alone."""
    index = torch.arange(document_ids.shape[-1], device=document_ids.device).expand_as(document_ids)
    starts = document_ids[:, 1:] != document_ids[:, :-1]
    starts = torch.cat((torch.ones_like(starts[:, :1]), starts), dim=-1)
    return index - torch.where(starts, index, 0).cummax(-1).values
