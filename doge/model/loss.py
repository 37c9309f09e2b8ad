"""Next-token cross-entropy fused with the LM head, computed in chunks of tokens.

At Doge sizes the 32768-wide LM head dominates training: full logits for a 2048-token row are
2048 x 32768 floats (268 MB in float32), written, soft-maxed, read back and differentiated. Here
each chunk of tokens computes its logits, its loss and right away its gradients with respect to
the hidden states and the head weight (softmax minus one-hot), so no full logits tensor ever
exists and the backward pass only rescales what the forward pass stored.

Semantics are those of `transformers`' ForCausalLMLoss: labels are shifted left by one, -100 is
ignored, the mean is over valid tokens (or the sum divided by `num_items_in_batch` when given).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts labels[t + 1]; the last position predicts nothing."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, denominator, compute_dtype):
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        w = weight.to(compute_dtype)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], CHUNK_TOKENS):
            h = hidden[start:start + CHUNK_TOKENS].to(compute_dtype)
            t = targets[start:start + CHUNK_TOKENS]
            logits = (h @ w.T).float()
            valid = t != IGNORE_INDEX
            safe_t = t.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe_t[:, None]).squeeze(1)) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            grad_logits = torch.softmax(logits, dim=-1, out=logits)
            grad_logits[torch.arange(len(t)), safe_t] -= 1.0
            grad_logits *= (valid.float() / denominator)[:, None]
            grad_logits = grad_logits.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + CHUNK_TOKENS] = (grad_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / denominator

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def fused_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Loss of `hidden @ weight.T` against shifted `labels`, without materialising the logits.

    The softmax is always float32. The matmuls run in the autocast dtype on accelerators and in
    float32 on CPU: on a CPU without native bf16 (this project's 2-core AVX2 machine) the bf16
    GEMMs with the 32768-wide vocab dimension measured 7x (logits) to 300x (hidden gradient)
    slower than float32.
    """
    targets = shift_labels(labels).reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        denominator = (targets != IGNORE_INDEX).sum().clamp(min=1).float()
    else:
        denominator = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    device_type = hidden.device.type
    compute_dtype = torch.float32
    if device_type != "cpu" and torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, denominator, compute_dtype)
