"""Dynamic Mask Attention (DMA): all of its maths lives here.

Each key position gets one learned number per KV head from its value states,

    bias[b, h, j] = exp(A[h] * softplus(dt_proj(v[b, j])[h]))

which is added to every query's score for key j. Scores are q.k * scaling + bias, causal.
When a query can see more than `keep_window` keys, it keeps only the `keep_window` visible keys
with the largest bias and masks the rest (the reference picks them with `topk` over a materialised
L x L mask). Ties between equal biases (e.g. at initialisation, where A = 0 makes every bias 1)
are broken towards the most recent key, so an untrained model behaves as a sliding window.

Fast path (every visible key kept): no L x L float mask is built. The bias is folded into one
extra q/k dimension, q' = [q, 1/scaling], k' = [k, bias], so q'.k' * scaling = q.k * scaling + bias
and SDPA's fused causal kernel runs; the bias still gets its gradient through k'. q/k/v are padded
to a multiple of 8 so the fused CPU kernel accepts them.

With a fixed-length (static) KV cache the keys are the whole preallocated buffer, of which only the
first positions are filled. The caller then passes the queries' absolute positions and each query
sees the keys at positions <= its own: empty slots lie in every query's future, so the causal
mask hides them without reading the fill level back to the host.

Sparse path (more visible keys than the window): the bias depends on the key only, so every
query ranks the keys the same way and query i keeps the `keep_window` best-ranked keys of 0..i.
Queries are processed in chunks of QUERY_CHUNK. A key outside the best `keep_window` before a
chunk is out-ranked by keys every later query sees, so a chunk's candidates are those best keys
plus its own QUERY_CHUNK keys: it gathers just those and attends to them under a (chunk x
candidates) boolean mask. Compute and peak memory per head grow as O(L * keep_window), never
O(L^2), and every shape is fixed by L and the window: the path runs on the device without reading
anything back, so it compiles into one graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUERY_CHUNK = 512


def dynamic_bias(value_states: torch.Tensor, dt_proj: nn.Linear, A: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, Lk, D) value states -> (B, Hkv, Lk) additive per-key bias."""
    batch, kv_heads, length, dim = value_states.shape
    dt = dt_proj(value_states.transpose(1, 2).reshape(batch, length, kv_heads * dim))
    return _bias_from_dt(dt, A).transpose(1, 2)


@torch.library.custom_op("doge::bias_from_dt", mutates_args=())
def _bias_from_dt(dt: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """exp(A * softplus(dt)) as one opaque operator. A compiled graph calls it as it is instead of
    generating its own exp and softplus, which differ from eager's in the last bit: the sparse path
    keeps or drops keys by comparing these biases, so eager and compiled keep the same keys."""
    return torch.exp(A * F.softplus(dt))


@_bias_from_dt.register_fake
def _(dt, A):
    return torch.empty_like(dt, dtype=torch.promote_types(dt.dtype, A.dtype))


def _bias_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def _bias_backward(ctx, grad):
    """Autograd's own chain for exp, mul and softplus, in the same order."""
    dt, A, bias = ctx.saved_tensors
    grad_exponent = grad * bias
    grad_dt = torch.ops.aten.softplus_backward(grad_exponent * A, dt, 1.0, 20.0)
    grad_A = (grad_exponent * F.softplus(dt)).sum_to_size(A.shape)
    return grad_dt.to(dt.dtype), grad_A.to(A.dtype)


_bias_from_dt.register_autograd(_bias_backward, setup_context=_bias_setup)


def fold_bias(q, k, v, bias, scaling: float):
    """Append the bias as an extra q/k dimension and pad q/k/v to a multiple of 8."""
    dim = q.shape[-1]
    pad = (-(dim + 1)) % 8
    ones = torch.full((*q.shape[:-1], 1), 1.0 / scaling, dtype=q.dtype, device=q.device)
    q = F.pad(torch.cat((q, ones), dim=-1), (0, pad))
    k = F.pad(torch.cat((k, bias.unsqueeze(-1).to(k.dtype)), dim=-1), (0, pad))
    v = F.pad(v, (0, pad + 1))
    return q, k, v


def query_rows(q_len: int, k_len: int, query_positions: torch.Tensor | None, device) -> torch.Tensor:
    """Absolute positions of the queries: given, or the last q_len of the k_len keys."""
    if query_positions is not None:
        return query_positions.to(device)
    return torch.arange(k_len - q_len, k_len, device=device)


def real_keys(key_mask: torch.Tensor | None, k_len: int) -> torch.Tensor | None:
    """(B, k_len) bool padding mask fitted to the keys: a static cache holds more slots than the mask
    covers (the extra ones are in every query's future, so marking them False changes nothing)."""
    if key_mask is None:
        return None
    key_mask = key_mask[:, :k_len].bool()
    return F.pad(key_mask, (0, k_len - key_mask.shape[-1]), value=False)


def visible_keys(q_len: int, k_len: int, key_mask: torch.Tensor | None, device,
                 query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """(B or 1, 1, q_len, k_len) bool: key j is visible to a query at position i when j <= i."""
    rows = query_rows(q_len, k_len, query_positions, device)[:, None]
    visible = (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]
    if key_mask is not None:
        visible = visible & real_keys(key_mask, k_len)[:, None, None, :]
    return visible


def key_ranks(bias: torch.Tensor) -> torch.Tensor:
    """Rank of each key by (bias descending, position descending): 0 is the most wanted key."""
    length = bias.shape[-1]
    order = torch.sort(bias.flip(-1).float(), dim=-1, descending=True, stable=True).indices
    positions = (length - 1) - order
    ranks = torch.empty_like(positions)
    arange = torch.arange(length, device=bias.device).expand_as(positions)
    return ranks.scatter_(-1, positions, arange).float()


def _sdpa(q, k, v, scaling, **kwargs):
    """SDPA with K/V repeated to the query heads. (SDPA's own enable_gqa has a CPU backward that
    was 3-5x slower with 2 threads than with 1 here; the copy costs B*H*L*D floats.)"""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, scale=scaling, **kwargs)


def dma_attention(q, k, v, bias, *, scaling: float, keep_window: int, key_mask: torch.Tensor | None = None,
                  query_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with the dynamic mask.

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D); bias: (B, Hkv, Lk); key_mask: (B, <= Lk) with 1 for real
    tokens (padding otherwise) or None. query_positions: (Lq,) absolute positions of the queries
    (static cache: keys past them are empty slots), or None when the queries are the last Lq keys.
    Every branch depends on shapes and arguments only, never on tensor values (torch.export).
    Returns (B, H, Lq, D).
    """
    q_len, k_len, dim = q.shape[2], k.shape[2], q.shape[-1]
    qf, kf, vf = fold_bias(q, k, v, bias, scaling)
    if k_len > keep_window:
        out = _sparse_attention(qf, kf, vf, bias, scaling, keep_window, key_mask, query_positions)
    elif key_mask is None and query_positions is None and q_len == k_len:
        out = _sdpa(qf, kf, vf, scaling, is_causal=True)
    elif key_mask is None and query_positions is None and q_len == 1:
        out = _sdpa(qf, kf, vf, scaling)
    else:
        visible = visible_keys(q_len, k_len, key_mask, q.device, query_positions)
        out = _sdpa(qf, kf, vf, scaling, attn_mask=visible)
    return out[..., :dim]


def eager_dma_attention(q, k, v, bias, *, scaling: float, keep_window: int, key_mask: torch.Tensor | None = None,
                        query_positions: torch.Tensor | None = None):
    """The same attention from a materialised (B, H, Lq, Lk) score matrix, also returning the weights
    (`attn_implementation="eager"`, `output_attentions=True`). Arguments as `dma_attention`."""
    q_len, k_len = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    keep = visible_keys(q_len, k_len, key_mask, q.device, query_positions).expand(*bias.shape[:2], q_len, k_len)
    if k_len > keep_window:
        ranks = key_ranks(bias.detach())[:, :, None, :].expand(-1, -1, q_len, -1)
        wanted = torch.where(keep, -ranks, float("-inf")).topk(keep_window, dim=-1).indices
        keep = keep & torch.zeros_like(ranks, dtype=torch.bool).scatter_(-1, wanted, True)
    scores = (q @ k.repeat_interleave(groups, dim=1).transpose(-1, -2)) * scaling
    scores = scores + bias.repeat_interleave(groups, dim=1)[:, :, None, :].to(scores.dtype)
    scores = scores.masked_fill(~keep.repeat_interleave(groups, dim=1), torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return weights @ v.repeat_interleave(groups, dim=1), weights


def _sparse_attention(qf, kf, vf, bias, scaling, keep_window, key_mask, query_positions):
    """Chunk over queries; each chunk attends only to the keys some query of it can keep.

    A key before the chunk that is not among the `keep_window` best-ranked keys before the chunk
    is out-ranked by that many keys every later query sees, so no later query keeps it. The
    candidates of a chunk are therefore the carried best keys plus the chunk's own keys; sorted by
    rank, query i keeps the first `keep_window` of those at positions <= i (a cumulative count),
    and the chunk's best `keep_window` candidates are carried on. All of it is tensor work of fixed
    shapes: no host reads, nothing that stops a compiled graph. Padding keys rank last and are
    never kept. With a static cache (query_positions given) the queries' offset is read back once;
    that path serves generation only."""
    q_len, k_len = qf.shape[2], kf.shape[2]
    groups = qf.shape[1] // kf.shape[1]
    offset = k_len - q_len if query_positions is None else int(query_positions[0])
    ranks = key_ranks(bias.detach())
    real = real_keys(key_mask, k_len)
    if real is not None:
        ranks = ranks.masked_fill(~real[:, None], float("inf"))
    carried = ranks[..., :offset].topk(min(keep_window, offset), dim=-1, largest=False).indices
    outs = []
    # One chunk needs no loop over the length, which a compiled graph would have to fix per length.
    for start in range(0, q_len, QUERY_CHUNK) if q_len > QUERY_CHUNK else (0,):
        stop = min(start + QUERY_CHUNK, q_len)
        first, last = offset + start, offset + stop  # the chunk's query positions
        index, keep = _chunk_keys(ranks, carried, first, last, keep_window)
        keys, values = (t.gather(2, index[..., None].expand(-1, -1, -1, t.shape[-1])) for t in (kf, vf))
        if groups > 1:
            keep = keep.repeat_interleave(groups, dim=1)
        outs.append(_sdpa(qf[:, :, start:stop], keys, values, scaling, attn_mask=keep))
        carried = index[..., :keep_window]
    return torch.cat(outs, dim=2)


def _chunk_keys(ranks, carried, first: int, last: int, keep_window: int):
    """Candidate key positions (B, Hkv, N) of the queries at positions first..last-1, best rank
    first, and the (B, Hkv, last - first, N) mask of which query keeps which candidate."""
    batch, heads = ranks.shape[:2]
    fresh = torch.arange(first, last, device=ranks.device).expand(batch, heads, -1)
    index = torch.cat((carried, fresh), dim=-1)
    candidate_ranks, order = ranks.gather(-1, index).sort(dim=-1)
    index = index.gather(-1, order)
    queries = torch.arange(first, last, device=ranks.device)
    visible = (index[:, :, None, :] <= queries[:, None]) & candidate_ranks.isfinite()[:, :, None, :]
    return index, visible & (visible.cumsum(-1) <= keep_window)
