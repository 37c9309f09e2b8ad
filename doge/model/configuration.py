"""`DogeConfig` and the named model presets.

The config *is* `transformers.DogeConfig` (same keys, same meaning, model_type "doge"), so a
config.json written here loads in stock `transformers` and vice versa. What this module adds is
the published Doge size table as named presets, plus a tiny preset for tests and demos, and two
CDMoE router keys stock does not have (it keeps them as plain attributes and ignores them, so an
export that sets them still loads there).
"""
from __future__ import annotations

import typing

import transformers

# Shared by every published Doge recipe (docs/recipes.md).
_COMMON = dict(
    vocab_size=32768,
    tie_word_embeddings=True,
    max_position_embeddings=2048,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    hidden_act="silu",
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    keep_window_size=2048,
)

PRESETS: dict[str, dict] = {
    "doge-tiny": dict(_COMMON, vocab_size=4096, hidden_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=256),
    "doge-20m": dict(_COMMON, hidden_size=256, num_hidden_layers=8,
                     num_attention_heads=2, num_key_value_heads=1, intermediate_size=512),
    "doge-60m": dict(_COMMON, hidden_size=512, num_hidden_layers=16,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=1024),
    "doge-160m": dict(_COMMON, hidden_size=768, num_hidden_layers=24,
                      num_attention_heads=6, num_key_value_heads=3, intermediate_size=1536),
    "doge-320m": dict(_COMMON, hidden_size=1024, num_hidden_layers=32,
                      num_attention_heads=8, num_key_value_heads=4, intermediate_size=2048),
}

# Upcycled CDMoE recipes: dense preset -> (num_experts, num_experts_per_tok).
MOE_RECIPES: dict[str, tuple[int, int]] = {
    "doge-20m": (1024, 16),
    "doge-60m": (4096, 32),
    "doge-160m": (9216, 48),
}


class DogeConfig(transformers.DogeConfig):
    """`transformers.DogeConfig` plus `from_preset`. Keys and defaults are the stock ones, plus:

    - `router_z_loss_coef`: weight of the router z-loss (`doge.model.cdmoe.router_z_loss`) that the
      trainer adds to its loss, as stock's `router_aux_loss_coef` weights the load-balancing loss;
    - `router_fp32`: CDMoE routing (router logits, top-k, routing softmax) in float32 when the model
      runs in bf16. It changes what the model computes, so it travels with the weights: inference
      then routes as training did. Stock, which ignores it, routes in the model's dtype.

    Class attributes, not dataclass fields: a config.json without them (stock's, older exports)
    reads them as off, and a config that never set them writes nothing new."""

    router_z_loss_coef: typing.ClassVar[float] = 0.0
    router_fp32: typing.ClassVar[bool] = False

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DogeConfig":
        """Build a preset config; `overrides` replace any key (e.g. `is_moe=True`, `vocab_size=...`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        kwargs = dict(PRESETS[name])
        if overrides.get("is_moe") and name in MOE_RECIPES:
            experts, top_k = MOE_RECIPES[name]
            kwargs.update(num_experts=experts, num_experts_per_tok=top_k)
        kwargs.update(overrides)
        return cls(**kwargs)
