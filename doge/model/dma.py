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

Documents (packed rows): with `document_ids` a query sees only the earlier keys of its own
document, a document being a run of equal ids along the row (packing makes them non-decreasing).
- Fast path on CPU: the fold gets one more q/k column per bit of the document's index in the row,
  q = bit / scaling and k = -DOCUMENT_PENALTY * (1 - bit). A query of a later document has a 1
  where an earlier document has a 0 at their highest differing bit, so a key of an earlier
  document loses at least DOCUMENT_PENALTY and its weight underflows to exactly 0; within a
  document every added product is exactly 0, so the scores are unchanged to the bit. SDPA's
  causal kernel runs as before on a few more dimensions (a boolean L x L mask costs about twice:
  the fused kernel then visits every block).
- Fast path on CUDA: FlexAttention with the bias as a score_mod and a block mask of same-document
  causal pairs, so key blocks of other documents are skipped, not masked.
- Sparse path: keys are ranked document-major (later documents first, then bias, then position),
  so the best `keep_window` keys carried into a chunk always hold the best keys of the current
  document; candidates of other documents are masked.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

QUERY_CHUNK = 512
# What a key of an earlier document loses per differing bit of the document index (fast CPU path):
# far beyond any real score, so exp() of the difference is exactly 0 in float32 and bfloat16.
DOCUMENT_PENALTY = 1e9


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


def fold_bias(q, k, v, bias, scaling: float, documents: torch.Tensor | None = None):
    """Append the bias as an extra q/k dimension (and given `documents`, the document columns of
    `document_columns`) and pad q/k/v to a multiple of 8."""
    q_extra = [torch.full((*q.shape[:-1], 1), 1.0 / scaling, dtype=q.dtype, device=q.device)]
    k_extra = [bias.unsqueeze(-1).to(k.dtype)]
    if documents is not None:
        q_bits, k_bits = document_columns(documents, scaling, q.dtype)
        q_extra.append(q_bits.expand(-1, q.shape[1], -1, -1))
        k_extra.append(k_bits.expand(-1, k.shape[1], -1, -1))
    q, k = torch.cat((q, *q_extra), dim=-1), torch.cat((k, *k_extra), dim=-1)
    pad = (-q.shape[-1]) % 8
    return F.pad(q, (0, pad)), F.pad(k, (0, pad)), F.pad(v, (0, q.shape[-1] + pad - v.shape[-1]))


def document_index(document_ids: torch.Tensor | None, q_len: int, k_len: int,
                   query_positions: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) document ids -> (B, L) int64 index of each token's document in its row (0, 1, ...: a
    new document wherever the id changes), or None. Documents apply to a row attended as a whole
    (training, or a prompt's first forward), not to queries appended to a cache."""
    if document_ids is None:
        return None
    if query_positions is not None or not document_ids.shape[-1] == q_len == k_len:
        raise ValueError(f"document_ids of length {document_ids.shape[-1]} need the whole row at once: "
                         f"{q_len} queries over {k_len} keys (a cache holding earlier tokens) cannot take them")
    starts = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.cat((torch.zeros_like(starts[:, :1]), starts), dim=-1).cumsum(-1)


def document_columns(documents: torch.Tensor, scaling: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, L, bits) q and k columns of the document index's bits (see the module docstring):
    q.k adds -DOCUMENT_PENALTY for every bit where the query has a 1 and the key a 0, and 0 exactly
    for a key of the query's own document."""
    bits = max(1, (documents.shape[-1] - 1).bit_length())
    shifts = torch.arange(bits, device=documents.device)
    ones = ((documents[:, None, :, None] >> shifts) & 1).to(dtype)
    return ones / scaling, (1 - ones) * -DOCUMENT_PENALTY


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
                 query_positions: torch.Tensor | None = None, documents: torch.Tensor | None = None) -> torch.Tensor:
    """(B or 1, 1, q_len, k_len) bool: key j is visible to a query at position i when j <= i (and
    given `documents`, from `document_index`, when both are in one document)."""
    rows = query_rows(q_len, k_len, query_positions, device)[:, None]
    visible = (torch.arange(k_len, device=device)[None, :] <= rows)[None, None]
    if key_mask is not None:
        visible = visible & real_keys(key_mask, k_len)[:, None, None, :]
    if documents is not None:
        visible = visible & (documents[:, None, :, None] == documents[:, None, None, :])
    return visible


def key_ranks(bias: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
    """Rank of each key by (bias descending, position descending): 0 is the most wanted key. Given
    `documents`, document-major first (later documents outrank earlier ones): a second stable sort
    of that order, so no composite number has to hold L * L ranks exactly."""
    length = bias.shape[-1]
    order = torch.sort(bias.flip(-1).float(), dim=-1, descending=True, stable=True).indices
    positions = (length - 1) - order
    if documents is not None:
        key_documents = documents[:, None].expand_as(positions).gather(-1, positions)
        positions = positions.gather(-1, key_documents.sort(dim=-1, descending=True, stable=True).indices)
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
                  query_positions: torch.Tensor | None = None,
                  document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with the dynamic mask.

    q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D); bias: (B, Hkv, Lk); key_mask: (B, <= Lk) with 1 for real
    tokens (padding otherwise) or None. query_positions: (Lq,) absolute positions of the queries
    (static cache: keys past them are empty slots), or None when the queries are the last Lq keys.
    document_ids: (B, L) ids of the documents packed in each row (see the module docstring), or None.
    Every branch depends on shapes, arguments and the device type only, never on tensor values
    (torch.export). Returns (B, H, Lq, D).
    """
    q_len, k_len, dim = q.shape[2], k.shape[2], q.shape[-1]
    documents = document_index(document_ids, q_len, k_len, query_positions)
    if k_len > keep_window:
        qf, kf, vf = fold_bias(q, k, v, bias, scaling)
        out = _sparse_attention(qf, kf, vf, bias, scaling, keep_window, key_mask, query_positions, documents)
    elif documents is not None and key_mask is None and q.is_cuda:
        return flex_document_attention(q, k, v, bias, scaling, documents)
    elif key_mask is None and query_positions is None and q_len == k_len:
        out = _sdpa(*fold_bias(q, k, v, bias, scaling, documents), scaling, is_causal=True)
    elif key_mask is None and query_positions is None and q_len == 1:
        out = _sdpa(*fold_bias(q, k, v, bias, scaling), scaling)
    else:
        visible = visible_keys(q_len, k_len, key_mask, q.device, query_positions, documents)
        out = _sdpa(*fold_bias(q, k, v, bias, scaling), scaling, attn_mask=visible)
    return out[..., :dim]


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def _flex(device: torch.device):
    """FlexAttention as a fused kernel: inside a compiled graph (the trainer's compiled layers) it
    compiles with the graph; outside, through its own torch.compile. Eager FlexAttention is an
    unfused reference (forward only on CPU) that serves to check it."""
    from torch.nn.attention.flex_attention import flex_attention  # torch >= 2.5, imported where used

    if device.type != "cuda" or torch.compiler.is_compiling():
        return flex_attention
    return _compiled_flex()


def flex_document_attention(q, k, v, bias, scaling: float, documents: torch.Tensor) -> torch.Tensor:
    """The fast path over packed documents as FlexAttention: the bias is a score_mod (it gets its
    gradient through it) and the mask a block mask of same-document causal pairs, so key blocks
    that no query of a block sees are skipped. `documents` from `document_index`; shapes as
    `dma_attention`."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, length = documents.shape
    groups = q.shape[1] // k.shape[1]

    def same_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (documents[b, q_idx] == documents[b, kv_idx])

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b, h // groups, kv_idx]

    blocks = create_block_mask(same_document, batch, None, length, length, device=q.device)
    return _flex(q.device)(q, k, v, score_mod=add_bias, block_mask=blocks, scale=scaling, enable_gqa=groups > 1)


def eager_dma_attention(q, k, v, bias, *, scaling: float, keep_window: int, key_mask: torch.Tensor | None = None,
                        query_positions: torch.Tensor | None = None, document_ids: torch.Tensor | None = None):
    """The same attention from a materialised (B, H, Lq, Lk) score matrix, also returning the weights
    (`attn_implementation="eager"`, `output_attentions=True`). Arguments as `dma_attention`."""
    q_len, k_len = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    documents = document_index(document_ids, q_len, k_len, query_positions)
    keep = visible_keys(q_len, k_len, key_mask, q.device, query_positions, documents)
    keep = keep.expand(*bias.shape[:2], q_len, k_len)
    if k_len > keep_window:
        ranks = key_ranks(bias.detach())[:, :, None, :].expand(-1, -1, q_len, -1)
        wanted = torch.where(keep, -ranks, float("-inf")).topk(keep_window, dim=-1).indices
        keep = keep & torch.zeros_like(ranks, dtype=torch.bool).scatter_(-1, wanted, True)
    scores = (q @ k.repeat_interleave(groups, dim=1).transpose(-1, -2)) * scaling
    scores = scores + bias.repeat_interleave(groups, dim=1)[:, :, None, :].to(scores.dtype)
    scores = scores.masked_fill(~keep.repeat_interleave(groups, dim=1), torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return weights @ v.repeat_interleave(groups, dim=1), weights


def _sparse_attention(qf, kf, vf, bias, scaling, keep_window, key_mask, query_positions, documents):
    """Chunk over queries; each chunk attends only to the keys some query of it can keep.

    A key before the chunk that is not among the `keep_window` best-ranked keys before the chunk
    is out-ranked by that many keys every later query sees, so no later query keeps it. The
    candidates of a chunk are therefore the carried best keys plus the chunk's own keys; sorted by
    rank, query i keeps the first `keep_window` of those at positions <= i (a cumulative count),
    and the chunk's best `keep_window` candidates are carried on. All of it is tensor work of fixed
    shapes: no host reads, nothing that stops a compiled graph. Padding keys rank last and are
    never kept. With documents the ranks are document-major: the keys before the chunk that
    out-rank a key of the current document are of that document too, so the argument holds within
    each document. With a static cache (query_positions given) the queries' offset is read back
    once; that path serves generation only."""
    q_len, k_len = qf.shape[2], kf.shape[2]
    groups = qf.shape[1] // kf.shape[1]
    offset = k_len - q_len if query_positions is None else int(query_positions[0])
    ranks = key_ranks(bias.detach(), documents)
    real = real_keys(key_mask, k_len)
    if real is not None:
        ranks = ranks.masked_fill(~real[:, None], float("inf"))
    carried = ranks[..., :offset].topk(min(keep_window, offset), dim=-1, largest=False).indices
    outs = []
    # One chunk needs no loop over the length, which a compiled graph would have to fix per length.
    for start in range(0, q_len, QUERY_CHUNK) if q_len > QUERY_CHUNK else (0,):
        stop = min(start + QUERY_CHUNK, q_len)
        first, last = offset + start, offset + stop  # the chunk's query positions
        index, keep = _chunk_keys(ranks, carried, first, last, keep_window, documents)
        keys, values = (t.gather(2, index[..., None].expand(-1, -1, -1, t.shape[-1])) for t in (kf, vf))
        if groups > 1:
            keep = keep.repeat_interleave(groups, dim=1)
        outs.append(_sdpa(qf[:, :, start:stop], keys, values, scaling, attn_mask=keep))
        carried = index[..., :keep_window]
    return torch.cat(outs, dim=2)


def _chunk_keys(ranks, carried, first: int, last: int, keep_window: int, documents=None):
    """Candidate key positions (B, Hkv, N) of the queries at positions first..last-1, best rank
    first, and the (B, Hkv, last - first, N) mask of which query keeps which candidate (given
    `documents`: only candidates of the query's own document)."""
    batch, heads = ranks.shape[:2]
    fresh = torch.arange(first, last, device=ranks.device).expand(batch, heads, -1)
    index = torch.cat((carried, fresh), dim=-1)
    candidate_ranks, order = ranks.gather(-1, index).sort(dim=-1)
    index = index.gather(-1, order)
    queries = torch.arange(first, last, device=ranks.device)
    visible = (index[:, :, None, :] <= queries[:, None]) & candidate_ranks.isfinite()[:, :, None, :]
    if documents is not None:
        key_documents = documents[:, None].expand(-1, heads, -1).gather(-1, index)
        visible = visible & (key_documents[:, :, None, :] == documents[:, None, first:last, None])
    return index, visible & (visible.cumsum(-1) <= keep_window)
