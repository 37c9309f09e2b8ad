"""Cross Domain Mixture of Experts (CDMoE): routing maths and the layer.

A dense SwiGLU MLP (the shared expert) plus `num_experts` tiny experts, each a row of
`down_embed` and of `up_embed`. The router gives 2 * num_keys logits per token (num_keys =
floor(sqrt(num_experts))): the first half scores row keys, the second half column keys, and expert
(i, j) = i * num_keys + j scores s_x[i] + s_y[j] (product keys).

Each token's own logits are split in half. (The public reference reshapes all tokens' logits with
`.view(2, B*L, K)`, which mixes tokens: routing then leaks future tokens during training and
differs from one-token decoding. It agrees with this module only when B*L == 1.)

Top-k is sub-linear in num_experts: the best k pairs by s_x[i] + s_y[j] always lie among the
k best rows times the k best columns, so only k*k sums are formed instead of num_keys**2.

Both router losses are functions of one micro-batch's router logits (its own tokens, every layer),
so the training objective is the same whether a rank's experts are whole or sharded: expert
parallelism exchanges hidden states, never routing statistics.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


def product_key_topk(router_logits: torch.Tensor, num_keys: int, top_k: int):
    """(T, 2*num_keys) logits -> top_k (scores, expert indices), each (T, top_k), best first."""
    tokens = router_logits.shape[0]
    logits_x, logits_y = router_logits.view(tokens, 2, num_keys).unbind(1)
    k = min(top_k, num_keys)
    scores_x, rows = logits_x.topk(k, dim=-1)
    scores_y, cols = logits_y.topk(k, dim=-1)
    pair_scores = (scores_x[:, :, None] + scores_y[:, None, :]).reshape(tokens, k * k)
    pair_experts = (rows[:, :, None] * num_keys + cols[:, None, :]).reshape(tokens, k * k)
    scores, best = pair_scores.topk(top_k, dim=-1)
    return scores, pair_experts.gather(-1, best)


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style auxiliary loss over all layers: num_experts * sum_e f_e * P_e.

    f_e is the fraction of routed (token, slot) pairs sent to expert e and P_e the mean router
    probability of e, where a token's probability over all experts is the softmax of s_x[i] + s_y[j],
    which factorises as softmax(s_x)[i] * softmax(s_y)[j]; so P never needs a (T x E) tensor.
    `token_mask` (B, L) excludes padding.
    """
    num_keys = router_logits[0].shape[-1] // 2
    logits = torch.cat(router_logits, dim=0).float()  # (layers * T, 2K)
    weights = torch.ones(logits.shape[0], device=logits.device)
    if token_mask is not None:
        weights = token_mask.reshape(-1).float().repeat(len(router_logits)).to(logits.device)
    _, experts = product_key_topk(logits, num_keys, top_k)
    counts = torch.zeros(num_experts, device=logits.device).index_add_(
        0, experts.reshape(-1), weights.repeat_interleave(top_k))
    tokens_per_expert = counts / (weights.sum() * top_k)
    p_x, p_y = logits.view(-1, 2, num_keys).softmax(dim=-1).unbind(1)
    prob = ((p_x * weights[:, None]).T @ p_y).reshape(-1) / weights.sum()
    return num_experts * (tokens_per_expert[: num_keys * num_keys] * prob).sum()


def router_z_loss(router_logits: tuple[torch.Tensor, ...], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's z-loss on product keys: the mean over layers, tokens and the two halves of
    logsumexp(half's logits)^2, i.e. mean of (lse(s_x)^2 + lse(s_y)^2) / 2.

    Penalising each half (rather than lse over all experts, which is lse(s_x) + lse(s_y)) also
    stops the halves from drifting apart by opposite constants, which routing cannot see but which
    costs precision in the pair sums. `token_mask` (B, L) excludes padding.
    """
    num_keys = router_logits[0].shape[-1] // 2
    logits = torch.cat(router_logits, dim=0).float()  # (layers * T, 2K)
    per_token = logits.view(-1, 2, num_keys).logsumexp(dim=-1).square().mean(dim=-1)
    if token_mask is None:
        return per_token.mean()
    weights = token_mask.reshape(-1).float().repeat(len(router_logits)).to(logits.device)
    return (per_token * weights).sum() / weights.sum()


class DogeMLP(nn.Module):
    """Dense SwiGLU MLP (also the shared expert of CDMoE)."""

    def __init__(self, config):
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DogeCDMoE(DogeMLP):
    """Shared SwiGLU expert + product-key routed embedding experts. Returns (out, router_logits)."""

    def __init__(self, config):
        super().__init__(config)
        self.num_experts = config.num_experts
        self.num_keys = math.isqrt(config.num_experts)
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.router_fp32 = config.router_fp32
        if self.top_k > self.num_keys ** 2:
            raise ValueError(f"num_experts_per_tok={self.top_k} exceeds the {self.num_keys ** 2} "
                             f"routable experts of num_experts={self.num_experts}")
        self.router_gate = nn.Linear(config.hidden_size, 2 * self.num_keys, bias=False)
        self.down_embed = nn.Embedding(self.num_experts, config.hidden_size)
        self.up_embed = nn.Embedding(self.num_experts, config.hidden_size)

    def route(self, flat: torch.Tensor):
        """(T, hidden) -> (router_logits (T, 2K), routing weights (T, k), expert ids (T, k)).

        With `router_fp32` the logits, top-k and softmax are float32 whatever the model's dtype
        (bf16 weights under DeepSpeed, or autocast): bf16 logits carry ~3 significant digits, too
        few to order near-equal pair scores or to keep the z-loss meaningful."""
        if self.router_fp32:
            with torch.autocast(flat.device.type, enabled=False):
                router_logits = F.linear(flat.float(), self.router_gate.weight.float())
        else:
            router_logits = self.router_gate(flat)
        scores, experts = product_key_topk(router_logits, self.num_keys, self.top_k)
        weights = F.softmax(scores, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return router_logits, weights, experts

    def forward(self, x: torch.Tensor):
        flat = x.reshape(-1, x.shape[-1])
        router_logits, weights, experts = self.route(flat)
        down = F.embedding(experts, self.down_embed.weight)  # (T, k, hidden)
        gates = self.act_fn(torch.bmm(down.to(flat.dtype), flat.unsqueeze(-1)).squeeze(-1)) * weights
        routed = F.embedding_bag(experts, self.up_embed.weight, mode="sum",
                                 per_sample_weights=gates.to(self.up_embed.weight.dtype))
        return super().forward(x) + routed.view_as(x).to(x.dtype), router_logits
