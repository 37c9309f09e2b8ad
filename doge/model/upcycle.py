"""Upcycling maths: a dense Doge model turned into a CDMoE model that computes the same logits.

Its MLPs become the shared experts; the router and the expert tables are new, with `up_embed` at
zero so the routed output starts at exactly zero (and `up_embed`'s gradient does not). Used by the
trainer (`--upcycle-experts`) and by the `python -m doge.upcycle` command. torch and the model
are imported where they are used, so `check_experts` costs nothing before a command loads them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from doge.model.configuration import DogeConfig
    from doge.model.modeling import DogeForCausalLM

NEW_PARAMETERS = ("router_gate", "down_embed", "up_embed")


def check_experts(num_experts: int, top_k: int) -> None:
    """ValueError unless `num_experts` is a positive perfect square (product keys) and 1 <= `top_k` <= it."""
    if num_experts < 1:
        raise ValueError(f"{num_experts} experts: the count must be a positive perfect square (product keys), "
                         "e.g. 1024")
    if math.isqrt(num_experts) ** 2 != num_experts:
        raise ValueError(f"{num_experts} experts: the count must be a perfect square (product keys); "
                         f"e.g. {math.isqrt(num_experts) ** 2} or {(math.isqrt(num_experts) + 1) ** 2}")
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top-k {top_k} must be between 1 and the number of experts {num_experts}")


def upcycled_config(dense: DogeConfig, num_experts: int, top_k: int) -> DogeConfig:
    """`dense`'s config with CDMoE layers of `num_experts` experts, `top_k` per token."""
    from doge.model.configuration import DogeConfig

    if dense.is_moe:
        raise ValueError("the checkpoint is already a CDMoE model (config.is_moe is true)")
    check_experts(num_experts, top_k)
    return DogeConfig(**{**dense.to_dict(), "is_moe": True, "num_experts": num_experts,
                         "num_experts_per_tok": top_k})


def upcycle(dense: DogeForCausalLM, config: DogeConfig) -> DogeForCausalLM:
    """A CDMoE model of `config` (from `upcycled_config`) whose shared experts are `dense`'s MLPs
    and whose output equals `dense`'s; the router and `down_embed` are initialised by the global RNG."""
    import torch

    from doge.model.modeling import DogeForCausalLM

    moe = DogeForCausalLM(config).to(dense.dtype)
    result = moe.load_state_dict(dense.state_dict(), strict=False)
    unexpected_new = [k for k in result.missing_keys if not k.endswith(tuple(f"{p}.weight" for p in NEW_PARAMETERS))]
    if result.unexpected_keys or unexpected_new:
        raise ValueError(f"dense checkpoint does not match a Doge model: missing {unexpected_new}, "
                         f"unexpected {result.unexpected_keys}")
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.up_embed.weight.zero_()
    return moe
