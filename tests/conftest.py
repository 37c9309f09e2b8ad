"""Shared test helpers: the stock `transformers` Doge as the numerical reference."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

from doge import DogeConfig, DogeForCausalLM

os.environ.setdefault("WANDB_MODE", "offline")

# The data files the data, trainer and evaluation tests read: small, openly licensed, in the repository
# (tests/assets/SOURCES.md names each file's source, licence and how it was cut).
ASSETS = Path(__file__).resolve().parent / "assets"


def tiny_config(**overrides) -> DogeConfig:
    """A small float32 config with GQA (6 heads / 3 kv heads) and a big init so numbers are O(1)."""
    kwargs = dict(vocab_size=256, hidden_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=3, intermediate_size=128, keep_window_size=2048,
                  tie_word_embeddings=True, initializer_range=0.2, max_position_embeddings=512)
    kwargs.update(overrides)
    return DogeConfig(**kwargs)


def randomize_extras(model: torch.nn.Module, seed: int = 0) -> None:
    """Give the parameters that start constant (A = 0, residual scales = 1) random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".A"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif "residual" in name or "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def stock_twin(ours: DogeForCausalLM, attn: str = "eager") -> transformers.DogeForCausalLM:
    """The stock model with exactly our weights."""
    stock = transformers.DogeForCausalLM(transformers.DogeConfig(**ours.config.to_dict())).eval()
    stock.config._attn_implementation = attn
    result = stock.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return stock


@pytest.fixture
def pair():
    """factory: (ours, stock) with identical random weights for a config built by tiny_config."""
    def build(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        ours = DogeForCausalLM(tiny_config(**overrides)).eval()
        randomize_extras(ours, seed)
        return ours, stock_twin(ours)
    return build


def distinct_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Rows without repeated tokens: equal tokens give equal DMA biases (exact ties), whose order
    the reference's `topk` leaves unspecified."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(vocab, generator=gen)[:length] for _ in range(batch)])
