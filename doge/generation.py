"""Fast autoregressive decoding with a preallocated KV cache.

`model.generate` works (the model follows HF conventions), but its per-token bookkeeping costs far
more than the model itself at Doge sizes. `Decoder` keeps the per-token path short: one fused
q/k/v matmul and one fused gate/up matmul per layer (weights concatenated once, at start), keys,
values and DMA biases written in place into preallocated buffers, and the DMA attention itself
from `doge.dma` (so the sparse window applies once the context passes keep_window_size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from doge.dma import dma_attention, dynamic_bias
from doge.modeling import DogeForCausalLM
from doge.rope import apply_rotary


class _Layer:
    """Fused weights and cache buffers of one decoder layer."""

    def __init__(self, layer, batch: int, capacity: int, dtype, device):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer, self.attn = layer, attn
        self.qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).to(dtype)
        self.splits = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
        self.gate_up = None if hasattr(mlp, "router_gate") else \
            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).to(dtype)
        kv_heads = attn.k_proj.out_features // attn.head_dim
        self.keys = torch.zeros(batch, kv_heads, capacity, attn.head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.bias = torch.zeros(batch, kv_heads, capacity, dtype=dtype, device=device)
        if any(p is not None for p in (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)):
            raise NotImplementedError("Decoder supports attention_bias=False (every Doge preset)")


class Decoder:
    """Greedy or sampled decoding for a `DogeForCausalLM`; prompt and output as (B, L) ids."""

    def __init__(self, model: DogeForCausalLM):
        self.model = model.eval()
        self.config = model.config
        self.dtype = model.dtype

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt followed by up to `max_new_tokens` tokens (stops early once every row hit EOS)."""
        batch, prompt_len = input_ids.shape
        capacity = prompt_len + max_new_tokens
        device = input_ids.device
        layers = [_Layer(layer, batch, capacity, self.dtype, device) for layer in self.model.model.layers]
        out = torch.empty(batch, capacity, dtype=torch.long, device=device)
        out[:, :prompt_len] = input_ids
        logits = self._step(layers, input_ids, 0)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for pos in range(prompt_len, capacity):
            token = self._pick(logits, temperature, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            out[:, pos] = token
            if pos + 1 == capacity or bool(done.all()):
                return out[:, : pos + 1]
            logits = self._step(layers, token[:, None], pos)
        return out

    @staticmethod
    def _pick(logits, temperature, generator):
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def _step(self, layers, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run `ids` (B, n) at positions start..start+n-1; return the last position's logits."""
        model = self.model.model
        h = model.embed_tokens(ids)
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        cos, sin = model.rotary_emb(positions, h.dtype)
        stop = start + ids.shape[1]
        for state in layers:
            h = self._layer(state, h, cos, sin, start, stop)
        return self.model.lm_head(model.norm(h[:, -1]))

    @staticmethod
    def _layer(state: _Layer, h, cos, sin, start, stop):
        layer, attn = state.layer, state.attn
        batch, length, _ = h.shape
        q, k, v = F.linear(layer.input_layernorm(h), state.qkv).split(state.splits, dim=-1)
        q = attn.q_norm(q.view(batch, length, -1, attn.head_dim)).transpose(1, 2)
        k = attn.k_norm(k.view(batch, length, -1, attn.head_dim)).transpose(1, 2)
        v = v.view(batch, length, -1, attn.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        state.keys[:, :, start:stop] = apply_rotary(k, cos, sin)
        state.values[:, :, start:stop] = v
        state.bias[:, :, start:stop] = dynamic_bias(v, attn.dt_proj, attn.A)
        a = dma_attention(q, state.keys[:, :, :stop], state.values[:, :, :stop], state.bias[:, :, :stop],
                          scaling=attn.scaling, keep_window=attn.keep_window_size)
        h = torch.addcmul(attn.o_proj(a.transpose(1, 2).reshape(batch, length, -1)), layer.input_residual, h)
        x = layer.post_attention_layernorm(h)
        if state.gate_up is None:
            mlp_out = layer.mlp(x)[0]
        else:
            gate, up = F.linear(x, state.gate_up).chunk(2, dim=-1)
            mlp_out = layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        return torch.addcmul(mlp_out, layer.post_attention_residual, h)

