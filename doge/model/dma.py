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
query ranks the keys the same way and query i keeps the keys whose rank is within the
`keep_window` best of keys 0..i. That cut-off is a running order statistic: one pass over the keys
with a heap of the `keep_window` best ranks gives every query's cut-off in O(L log keep_window).
Queries are then processed in chunks of QUERY_CHUNK. Cut-offs only tighten along the sequence, so
the keys any query of a chunk keeps are at most keep_window + QUERY_CHUNK; the chunk gathers just
those and attends to them under a (chunk x gathered keys) boolean mask. Compute and peak memory
per head grow as O(L * keep_window), never O(L^2).
"""
from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F
from torch import nn

QUERY_CHUNK = 512


def dynamic_bias(value_states: torch.Tensor, dt_proj: nn.Linear, A: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, Lk, D) value states -> (B, Hkv, Lk) additive per-key bias."""
    batch, kv_heads, length, dim = value_states.shape
    dt = dt_proj(value_states.transpose(1, 2).reshape(batch, length, kv_heads * dim))
    return torch.exp(A * F.softplus(dt)).transpose(1, 2)


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


def rank_cutoffs(ranks: torch.Tensor, key_mask: torch.Tensor | None, keep_window: int) -> torch.Tensor:
    """(B, Hkv, L) cut-offs: [..., i] is the keep_window-th smallest rank among the real keys
    0..i (inf while fewer are visible), so query i keeps exactly the visible keys ranked <= it.

    A max-heap of the keep_window best ranks seen so far, one pass per (batch, head) row on the
    host (ranks are a permutation, so there are no ties to break here)."""
    batch, heads, length = ranks.shape
    rows = ranks.detach().float().cpu().tolist()
    real = key_mask[:, :length].bool().cpu().tolist() if key_mask is not None else [[True] * length] * batch
    cutoffs = [[_running_cutoff(rows[b][h], real[b], keep_window) for h in range(heads)] for b in range(batch)]
    return torch.tensor(cutoffs, device=ranks.device)


def _running_cutoff(ranks: list, real: list, k: int) -> list:
    """[i] = the k-th smallest of the real ranks[:i + 1] (inf while fewer than k)."""
    best: list[float] = []  # a max-heap (negated) of the k smallest ranks so far
    out = []
    for rank, is_real in zip(ranks, real):
        if is_real:
            if len(best) < k:
                heapq.heappush(best, -rank)
            elif -rank > best[0]:
                heapq.heapreplace(best, -rank)
        out.append(-best[0] if len(best) == k else float("inf"))
    return out


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
    """Chunk over queries; each chunk attends only to the keys some query of it keeps.

    With a static cache (query_positions given) the slots after the last query are empty: they
    are marked as padding. The queries' offset is read back once here; this path already reads the
    ranks back for its cut-offs."""
    q_len, k_len = qf.shape[2], kf.shape[2]
    groups = qf.shape[1] // kf.shape[1]
    offset = k_len - q_len if query_positions is None else int(query_positions[0])
    key_mask = real_keys(key_mask, k_len)
    if query_positions is not None:
        filled = (torch.arange(k_len, device=qf.device) < offset + q_len).expand(qf.shape[0], -1)
        key_mask = filled if key_mask is None else key_mask & filled
    ranks = key_ranks(bias.detach())
    cutoffs = rank_cutoffs(ranks, key_mask, keep_window)
    real = key_mask[:, None] if key_mask is not None else None
    outs = []
    for start in range(0, q_len, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, q_len)
        first, last = offset + start, offset + stop  # the chunk's query positions
        index, keep = _chunk_keys(ranks[..., :last], cutoffs[..., first:last], real, first)
        keys, values = (t.gather(2, index[..., None].expand(-1, -1, -1, t.shape[-1])) for t in (kf, vf))
        if groups > 1:
            keep = keep.repeat_interleave(groups, dim=1)
        outs.append(_sdpa(qf[:, :, start:stop], keys, values, scaling, attn_mask=keep))
    return torch.cat(outs, dim=2)


def _chunk_keys(ranks, cutoffs, real, first: int):
    """Positions (B, Hkv, N) of the keys kept by any query of a chunk, and the (B, Hkv, n, N) mask
    of which query keeps which. Cut-offs only tighten along the sequence, so the chunk's first
    query's cut-off bounds them all: N <= keep_window + chunk, whatever the context length."""
    last = ranks.shape[-1]
    union = ranks <= cutoffs[..., :1]
    if real is not None:
        union = union & real[..., :last]
    count = int(union.sum(-1).max())
    index = torch.sort((~union).to(torch.uint8), dim=-1, stable=True).indices[..., :count]
    kept_ranks, in_union = ranks.gather(-1, index), union.gather(-1, index)
    queries = torch.arange(first, first + cutoffs.shape[-1], device=ranks.device)
    keep = (in_union[:, :, None, :] & (kept_ranks[:, :, None, :] <= cutoffs[..., None])
            & (index[:, :, None, :] <= queries[:, None]))
    return index, keep
