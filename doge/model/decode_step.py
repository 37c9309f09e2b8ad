"""The decode step: a `DogeForCausalLM`'s layers run on new positions against a preallocated KV cache.

The step keeps the per-token path short: one fused q/k/v matmul and one fused gate/up matmul per
layer (weights concatenated once, at start), one norm call for all q and k heads, rope rows looked
up from a table made once per generation, keys, values and DMA biases written in place into
preallocated buffers kept in the folded form the DMA kernel attends to (no per-token concatenation
of the cache), query heads grouped under their KV head (no per-token repeat of the cache), and the
DMA attention itself from `doge.model.dma` for prompts and past the window (so the sparse window
applies once the context passes keep_window_size).

It comes in two forms. `logits` runs any number of new positions given as Python ints, attending
up to the cache's end: the prompt, and every eager step. `static_hidden` runs one token per row at
a position held in a device tensor, attending to the whole cache under a causal mask: fixed
shapes, which compiled_step.py compiles and cuda_graph.py captures; generation.py's `Decoder`
chooses between them.

Weights other than "fp32" keep the dense linear weights and the LM head in fewer bytes for CPU
decoding (`doge.model.lowbit`): batch-1 decoding reads every weight once per token. Weights are
fused and packed when the step is built; build a new one after changing the model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from doge.model.dma import dma_attention, dynamic_bias
from doge.model.lowbit import PackedLinear
from doge.model.modeling import DogeForCausalLM


class _Weights:
    """A layer's weights as the decode step uses them, prepared once: fused (and, for weights
    other than fp32, packed) linears, the q and k norm scales as one (H + Hkv, D) table (one norm
    call for all heads), and plain tensors instead of module calls (no hooks on the hot path)."""

    def __init__(self, layer, weights: str):
        attn, mlp = layer.self_attn, layer.mlp
        dense = not hasattr(mlp, "router_gate")
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj] + \
            ([mlp.gate_proj, mlp.up_proj, mlp.down_proj] if dense else [])
        if any(linear.bias is not None for linear in linears):
            raise NotImplementedError("Decoder supports attention_bias=False and mlp_bias=False (every Doge preset)")
        self.replaced = [linear.weight for linear in linears]
        self.mlp, self.eps, self.head_dim = mlp, attn.q_norm.eps, attn.head_dim
        self.heads = attn.q_proj.out_features // attn.head_dim
        self.kv_heads = attn.k_proj.out_features // attn.head_dim
        self.scaling, self.keep_window = attn.scaling, attn.keep_window_size
        self.qkv = PackedLinear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), weights)
        self.o_proj = PackedLinear(attn.o_proj.weight, weights)
        self.qk_norm = torch.cat([attn.q_norm.weight.expand(self.heads, -1),
                                  attn.k_norm.weight.expand(self.kv_heads, -1)])
        self.dt_proj, self.A = attn.dt_proj, attn.A
        self.input_norm, self.post_norm = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.input_residual, self.post_residual = layer.input_residual, layer.post_attention_residual
        self.gate_up = PackedLinear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), weights) if dense else None
        self.down = PackedLinear(mlp.down_proj.weight, weights) if dense else None
        self.linears = [self.qkv, self.o_proj] + ([self.gate_up, self.down] if dense else [])

    def mlp_out(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.mlp(x)[0]
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.mlp.act_fn(gate) * up)


class _Layer:
    """A layer's cache for one generation, kept in the folded form `dma.fold_bias` gives (keys
    [k, bias, 0 pad], values [v, 0 pad], width a multiple of 8): a one-token step attends to the
    buffers as they are, with no per-token concatenation of the whole cache."""

    def __init__(self, weights: _Weights, batch: int, capacity: int, dtype, device):
        self.weights = w = weights
        width = w.head_dim + 1 + (-(w.head_dim + 1)) % 8
        self.keys = torch.zeros(batch, w.kv_heads, capacity, width, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.query = torch.zeros(batch, w.heads, width, dtype=dtype, device=device)
        self.query[..., w.head_dim] = 1.0 / w.scaling


class DecodeStep:
    """A model's decode step with its weights prepared once: each layer's in `layer_weights`
    (`layer_format`), the LM head in `lm_head` (`head_format`), see `doge.model.lowbit`."""

    def __init__(self, model: DogeForCausalLM, layer_format: str, head_format: str):
        self.model = model.eval()
        self.config = model.config
        self.dtype = model.dtype
        with torch.no_grad():
            self.layer_weights = [_Weights(layer, layer_format) for layer in model.model.layers]
            self.lm_head = PackedLinear(model.lm_head.weight, head_format)
        self.embed, self.norm = model.model.embed_tokens.weight, model.model.norm.weight
        self.eps = model.model.norm.eps


    def bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: the linears as stored, every other parameter as the
        model holds it, except the input embedding, of which a step reads one row per token (tied,
        that matrix is the LM head and counted as such)."""
        linears = [linear for w in self.layer_weights for linear in w.linears] + [self.lm_head]
        replaced = {id(p) for w in self.layer_weights for p in w.replaced} | {id(self.model.lm_head.weight)}
        rest = [p for p in self.model.parameters() if id(p) not in replaced and p is not self.embed]
        return sum(linear.nbytes for linear in linears) + sum(p.nbytes for p in rest)

    def logits(self, cache: DecodeCache, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run `ids` (B, n) at positions start..start+n-1; return the last position's logits. One
        token reads its rope row from the table; several get one rotary call, as the model's forward."""
        stop = start + ids.shape[1]
        if ids.shape[1] == 1:
            cos, sin = cache.cos[start:stop], cache.sin[start:stop]
        else:
            cos, sin = _rope(self.model.model.rotary_emb, torch.arange(start, stop, device=ids.device), self.dtype)
        return self.lm_head(self._hidden(cache, ids, cos, sin, slice(start, stop), None))

    def _hidden(self, cache, ids, cos, sin, at, key_mask):
        """The last position's final hidden state, normed (what the LM head reads). The layers
        carry the hidden states as (B * L, hidden) rows, so that a compiled batch-1 step hands its
        linears 2-D buffers: a (1, 1, hidden) buffer reaches BLAS as a view with a zero row stride,
        which the matmul first copies."""
        batch, length = ids.shape
        h = F.embedding(ids.flatten(), self.embed)
        for state in cache.layers:
            h = _layer(state, h, batch, cos, sin, at, key_mask)
        return _rms_norm(h.view(batch, length, -1)[:, -1], self.norm, self.eps)

    def static_hidden(self, cache, token, pos):
        """`_hidden` for one token per row at position `pos`, a (1,) tensor, attending to the whole
        cache under a causal mask: fixed shapes, what CUDA graphs and torch.compile take."""
        cos, sin = cache.cos.index_select(0, pos), cache.sin.index_select(0, pos)
        key_mask = (cache.positions <= pos).expand(token.shape[0], -1)
        return self._hidden(cache, token, cos, sin, pos, key_mask)

    def greedy_token(self, cache: DecodeCache, token, pos) -> torch.Tensor:
        """The static step's greedy choice after `token` (B, 1) at position `pos`, as (B, 1) ids."""
        return self.lm_head(self.static_hidden(cache, token, pos)).argmax(-1, keepdim=True)


class DecodeCache:
    """What one generation writes and looks up per token: each layer's buffers, and the rope rows
    of every position as a single-token step at that position computes them (x * cos +
    rotate_half(x) * sin = x * cos + x.roll(D/2) * sin with the sign folded into sin's first half).
    Length-dependent rope types scale with a call's last position, so they take one call per row."""

    def __init__(self, step: DecodeStep, batch: int, capacity: int, device):
        self.layers = [_Layer(w, batch, capacity, step.dtype, device) for w in step.layer_weights]
        self.static = capacity <= step.config.keep_window_size  # the static step can attend to it all
        rotary = step.model.model.rotary_emb
        self.positions = positions = torch.arange(capacity, device=device)
        rows = [positions] if rotary.rope_type == "default" else positions.split(1)
        tables = [_rope(rotary, p, step.dtype) for p in rows]
        self.cos, self.sin = (torch.cat(t) for t in zip(*tables))


def _rope(rotary, positions: torch.Tensor, dtype):
    """(L, D) cos and sign-folded sin for `positions`, from one rotary call as the model makes it."""
    cos, sin = rotary(positions.new_empty(0, dtype=dtype), positions[None])
    half = sin.shape[-1] // 2
    return cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)


def _rms_norm(x, weight, eps):
    """DogeRMSNorm's maths (float32 norm, cast back, then scaled) with the scale given: one call
    normalises the q and k heads together."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _layer(state: _Layer, h, batch: int, cos, sin, at, key_mask):
    """One decoder layer on new positions `at`, h (B * L, hidden): a slice (eager: attend to the
    cache up to its end) or a (1,) position tensor (static: the whole cache under `key_mask`)."""
    w = state.weights
    length = h.shape[0] // batch
    qkv = w.qkv(_rms_norm(h, w.input_norm, w.eps))
    qk_width = (w.heads + w.kv_heads) * w.head_dim
    qk = _rms_norm(qkv[:, :qk_width].view(batch, length, -1, w.head_dim), w.qk_norm, w.eps)
    qk = qk * cos[:, None] + qk.roll(w.head_dim // 2, dims=-1) * sin[:, None]
    v = qkv[:, qk_width:].view(batch, length, w.kv_heads, w.head_dim).transpose(1, 2)
    _write(state, qk[:, :, w.heads:].transpose(1, 2), v, dynamic_bias(v, w.dt_proj, w.A), at)
    h = torch.addcmul(w.o_proj(_attend(state, qk[:, :, : w.heads], at, key_mask)), w.input_residual, h)
    return torch.addcmul(w.mlp_out(_rms_norm(h, w.post_norm, w.eps)), w.post_residual, h)


def _write(state: _Layer, k, v, bias, at) -> None:
    """Store keys and values (B, Hkv, L, D) and biases (B, Hkv, L) at positions `at` (folded form).
    A position tensor (static step) gets whole folded rows copied into the buffers themselves: a
    compiled graph then scatters in place, where writing through a view copies the whole buffer."""
    dim = state.weights.head_dim
    if isinstance(at, slice):
        state.keys[:, :, at, :dim] = k
        state.keys[:, :, at, dim] = bias
        state.values[:, :, at, :dim] = v
        return
    pad = state.keys.shape[-1] - dim
    state.keys.index_copy_(2, at, F.pad(torch.cat([k, bias[..., None]], dim=-1), (0, pad - 1)))
    state.values.index_copy_(2, at, F.pad(v, (0, pad)))


def _attend(state: _Layer, q, at, key_mask) -> torch.Tensor:
    """DMA attention of (B, L, H, D) queries to the cache, as (B * L, H * D).

    One query per row inside the window (every decode step): `dma_attention`'s single-query branch
    on the folded tensors it would build, with the query heads grouped under their KV head (the
    cache is not repeated per head) and the fold constant already in the query buffer. The static
    step (the whole cache under `key_mask`) spells that attention out, softmax(q.k * scaling) v:
    compiled, it fuses into a few loops, cheaper at one query than a fused attention kernel.
    Otherwise (prompt, sparse window) `dma_attention` itself, on views of the folded cache."""
    w = state.weights
    batch, length = q.shape[:2]
    stop = state.keys.shape[2] if key_mask is not None else at.stop
    if length == 1 and stop <= w.keep_window:
        state.query[..., : w.head_dim] = q[:, 0]
        query = state.query.view(batch, w.kv_heads, -1, state.query.shape[-1])
        if key_mask is None:
            out = F.scaled_dot_product_attention(query, state.keys[:, :, :stop], state.values[:, :, :stop],
                                                 scale=w.scaling)
        else:
            scores = (query @ state.keys.transpose(-1, -2)) * w.scaling
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            out = scores.softmax(dim=-1) @ state.values
        return out[..., : w.head_dim].reshape(batch, -1)
    dim = w.head_dim
    keys, values, bias = state.keys[:, :, :stop, :dim], state.values[:, :, :stop, :dim], state.keys[:, :, :stop, dim]
    out = dma_attention(q.transpose(1, 2), keys, values, bias, scaling=w.scaling, keep_window=w.keep_window,
                        key_mask=key_mask)
    return out.transpose(1, 2).reshape(batch * length, -1)

