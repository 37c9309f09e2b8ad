"""The loss of a causal-LM micro-batch, shared by the language-modelling objectives.

Dense models: the next-token cross-entropy, fused with the LM head (no logits tensor). CDMoE
models: plus `config.router_aux_loss_coef` (the recipe's `aux_loss_weight`, set when the model is
built) x the Switch-style load-balancing loss over every CDMoE layer, which is what spreads
tokens over the experts (the model adds it to its loss when asked for router logits), plus
`config.router_z_loss_coef` (the recipe's `router_z_loss_weight`) x the router z-loss, which keeps
the router logits small (added here: stock's forward knows no z-loss). Both are functions of this
micro-batch's own tokens, so the objective (the mean over micro-batches and ranks) is the same for
any world size, gradient accumulation and expert-parallel size; `aux_loss` and `z_loss` are logged
as they entered it. Two router statistics are logged per micro-batch (mean over layers):
`experts_used`, the fraction of experts that got at least one token, and `max_load`, the busiest
expert's token count over the mean count (1.0 = perfectly balanced). With expert parallelism the
counts are summed over the expert group first, so both describe the load the group's shards
actually carry (statistics only: nothing is trained on them).
"""
from __future__ import annotations

import torch

from doge.model.cdmoe import product_key_topk, router_z_loss
from doge.training.objective import TrainedModel


@torch.no_grad()
def router_statistics(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                      group=None) -> dict:
    """`group`: the expert group whose token counts are added up (None: this micro-batch alone)."""
    used, max_load = [], []
    for logits in router_logits:
        num_keys = logits.shape[-1] // 2
        _, experts = product_key_topk(logits.float(), num_keys, top_k)
        flat = experts.reshape(-1)  # a fixed-size scatter, not bincount (which reads its size from the data)
        counts = torch.zeros(num_experts, device=flat.device).index_add_(0, flat, torch.ones_like(flat).float())
        if group is not None:
            torch.distributed.all_reduce(counts, group=group)
        used.append((counts > 0).float().mean())
        max_load.append(counts.max() / counts.mean())
    return {"experts_used": torch.stack(used).mean(), "max_load": torch.stack(max_load).mean()}


def causal_lm_loss(model: TrainedModel, input_ids: torch.Tensor, labels: torch.Tensor, **inputs):
    """(loss to back-propagate, metrics); `labels` -100 marks positions without a target; `inputs`:
    further model inputs (document ids, positions). The reported `loss` is the language-modelling
    part alone, comparable across dense and CDMoE runs."""
    config = model.config
    out = model(input_ids=input_ids, labels=labels, skip_logits=True, output_router_logits=config.is_moe,
                use_cache=False, **inputs)
    if not config.is_moe:
        return out.loss, {"loss": out.loss.detach()}
    aux, z = out.aux_loss.detach(), router_z_loss(out.router_logits)
    metrics = {"loss": out.loss.detach() - config.router_aux_loss_coef * aux, "aux_loss": aux,
               "z_loss": z.detach(),
               **router_statistics(out.router_logits, config.num_experts, config.num_experts_per_tok,
                                   model.expert_group)}
    return out.loss + config.router_z_loss_coef * z, metrics
