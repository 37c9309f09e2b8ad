"""Fast autoregressive decoding with a preallocated KV cache.

`model.generate` works (the model follows HF conventions), but its per-token bookkeeping costs far
more than the model itself at Doge sizes. `Decoder` keeps the per-token path short: one fused
q/k/v matmul and one fused gate/up matmul per layer (weights concatenated once, at start), keys,
values and DMA biases written in place into preallocated buffers, and the DMA attention itself
from `doge.model.dma` (so the sparse window applies once the context passes keep_window_size).

Greedy decoding that fits in the window (prompt + new tokens <= keep_window_size) can also run as
a *static* step: fixed shapes (attention over the whole preallocated cache, later positions masked
out), position and token read from and written to device tensors, the next token chosen inside
the step. On CUDA that step is captured once as a CUDA graph and replayed per token, so a token
costs one graph launch instead of hundreds of kernel launches from Python (decoding a small model
on a GPU is launch-bound). `Decoder(model, static="auto")` does this on CUDA; `static=True` runs
the same step without a graph anywhere (how CPU tests check it gives the same tokens).

`Decoder(model, weights="fp16" | "int8")` keeps the dense linear weights and the LM head in fewer
bytes for CPU decoding (`doge.model.lowbit`): batch-1 decoding reads every weight once per token.
Weights are fused and packed when the Decoder is built; build a new one after changing the model.
"""
from __future__ import annotations

import torch

from doge.model.dma import dma_attention, dynamic_bias
from doge.model.lowbit import packed_linear
from doge.model.modeling import DogeForCausalLM
from doge.model.rope import apply_rotary


class _Weights:
    """Fused (and, for weights other than fp32, packed) linear weights of one decoder layer."""

    def __init__(self, layer, weights: str):
        attn, mlp = layer.self_attn, layer.mlp
        self.layer, self.attn = layer, attn
        self.qkv = packed_linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), weights)
        self.splits = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
        self.o_proj = packed_linear(attn.o_proj.weight, weights)
        dense = not hasattr(mlp, "router_gate")
        self.gate_up = packed_linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), weights) if dense else None
        self.down = packed_linear(mlp.down_proj.weight, weights) if dense else None
        linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj] + \
            ([mlp.gate_proj, mlp.up_proj, mlp.down_proj] if dense else [])
        if any(linear.bias is not None for linear in linears):
            raise NotImplementedError("Decoder supports attention_bias=False and mlp_bias=False (every Doge preset)")


class _Layer:
    """A layer's weights and its cache buffers for one generation."""

    def __init__(self, weights: _Weights, batch: int, capacity: int, dtype, device):
        self.weights, self.layer, self.attn = weights, weights.layer, weights.attn
        attn = weights.attn
        kv_heads = attn.k_proj.out_features // attn.head_dim
        self.keys = torch.zeros(batch, kv_heads, capacity, attn.head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.bias = torch.zeros(batch, kv_heads, capacity, dtype=dtype, device=device)


EOS_CHECK_EVERY = 16  # static decoding reads the tokens back (a device sync) this often to stop at EOS


class Decoder:
    """Greedy or sampled decoding for a `DogeForCausalLM`; prompt and output as (B, L) ids.

    static: "auto" (static step + CUDA graph for greedy decoding on CUDA when it fits the window),
    True (static step wherever it fits, no graph off CUDA) or False (always the eager step).
    weights: "fp32" (as the model holds them), "fp16" or "int8" (CPU, float32 model; see lowbit).
    """

    def __init__(self, model: DogeForCausalLM, static: bool | str = "auto", weights: str = "fp32"):
        if static not in (True, False, "auto"):
            raise ValueError(f"static={static!r}: choose True, False or 'auto'")
        self.model = model.eval()
        self.config = model.config
        self.dtype = model.dtype
        self.static = static
        with torch.no_grad():
            self.layer_weights = [_Weights(layer, weights) for layer in model.model.layers]
            self.lm_head = packed_linear(model.lm_head.weight, weights)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt followed by up to `max_new_tokens` tokens (stops early once every row hit EOS)."""
        batch, prompt_len = input_ids.shape
        capacity = prompt_len + max_new_tokens
        layers, logits = self._prefill(input_ids, capacity)
        out = torch.empty(batch, capacity, dtype=torch.long, device=input_ids.device)
        out[:, :prompt_len] = input_ids
        if temperature <= 0 and self._use_static(capacity, input_ids.device):
            return self._generate_static(layers, out, logits.argmax(-1), prompt_len, eos_token_id)
        pos = prompt_len - 1
        for pos, token in enumerate(self._tokens(layers, logits, prompt_len, capacity, temperature, eos_token_id,
                                                 generator), start=prompt_len):
            out[:, pos] = token
        return out[:, : pos + 1]

    @torch.inference_mode()
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
               eos_token_id: int | None = None, generator: torch.Generator | None = None):
        """Yield each new token, (B,) ids, as soon as it is chosen (the eager step: for printing
        as it goes); the same tokens as `generate`."""
        capacity = input_ids.shape[1] + max_new_tokens
        layers, logits = self._prefill(input_ids, capacity)
        yield from self._tokens(layers, logits, input_ids.shape[1], capacity, temperature, eos_token_id, generator)

    @torch.inference_mode()
    def forced_logits(self, input_ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """(B, L - prompt_len + 1, V) float32 logits of the decode steps along given ids (teacher
        forcing): how reduced-precision weights are compared with fp32 on the same path."""
        layers, logits = self._prefill(input_ids[:, :prompt_len], input_ids.shape[1])
        steps = [logits] + [self._step(layers, input_ids[:, pos: pos + 1], pos)
                            for pos in range(prompt_len, input_ids.shape[1])]
        return torch.stack(steps, dim=1).float()

    def _prefill(self, input_ids: torch.Tensor, capacity: int):
        """Cache buffers for `capacity` positions, filled with the prompt; the last prompt logits."""
        layers = [_Layer(weights, input_ids.shape[0], capacity, self.dtype, input_ids.device)
                  for weights in self.layer_weights]
        return layers, self._step(layers, input_ids, 0)

    def _tokens(self, layers, logits, prompt_len: int, capacity: int, temperature, eos_token_id, generator):
        """Eager decoding: rows that hit EOS repeat it; stops at capacity or when every row is done."""
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        for pos in range(prompt_len, capacity):
            token = self._pick(logits, temperature, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            yield token
            if pos + 1 == capacity or bool(done.all()):
                return
            logits = self._step(layers, token[:, None], pos)

    @staticmethod
    def _pick(logits, temperature, generator):
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def _step(self, layers, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run `ids` (B, n) at positions start..start+n-1; return the last position's logits."""
        model = self.model.model
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        cos, sin = model.rotary_emb(ids.new_empty(0, dtype=self.dtype), positions)
        return self._forward(layers, ids, cos, sin, slice(start, start + ids.shape[1]), None)

    def _forward(self, layers, ids, cos, sin, at, key_mask):
        h = self.model.model.embed_tokens(ids)
        for state in layers:
            h = self._layer(state, h, cos, sin, at, key_mask)
        return self.lm_head(self.model.model.norm(h[:, -1]))

    def _use_static(self, capacity: int, device) -> bool:
        """The static step needs every position inside the window and a rope table that does not
        change with the length (dynamic NTK rescales past max_position_embeddings)."""
        if self.static is False or (self.static == "auto" and device.type != "cuda"):
            return False
        rope_fixed = (self.config.rope_parameters or {}).get("rope_type", "default") == "default" \
            or capacity <= self.config.max_position_embeddings
        return capacity <= self.config.keep_window_size and rope_fixed

    def _generate_static(self, layers, out, first, prompt_len: int, eos_token_id: int | None):
        """Greedy decoding with the static step, replayed as a CUDA graph on CUDA."""
        batch, capacity = out.shape
        device = out.device
        out[:, prompt_len] = first
        pos = torch.tensor([prompt_len], device=device)
        token = first[:, None].clone()
        positions = torch.arange(capacity, device=device)
        cos_table, sin_table = self.model.model.rotary_emb(out.new_empty(0, dtype=self.dtype), positions[None])

        def step():
            cos, sin = cos_table.index_select(1, pos), sin_table.index_select(1, pos)
            key_mask = (positions <= pos).expand(batch, capacity)
            nxt = self._forward(layers, token, cos, sin, pos, key_mask).argmax(-1)
            out.index_copy_(1, pos + 1, nxt[:, None])
            token.copy_(nxt[:, None])
            pos.add_(1)

        remaining, done = capacity - prompt_len - 1, 0  # tokens still to generate after `first`
        run = step
        if device.type == "cuda" and remaining:
            run, done = _cuda_graph(step), 1  # capturing ran the first step
        while done < remaining:
            if eos_token_id is not None and done % EOS_CHECK_EVERY == 0 and \
                    bool((out[:, prompt_len: prompt_len + done + 1] == eos_token_id).any(dim=1).all()):
                break
            run()
            done += 1
        return _cut_at_eos(out[:, : prompt_len + done + 1], prompt_len, eos_token_id)

    @staticmethod
    def _layer(state: _Layer, h, cos, sin, at, key_mask):
        """One decoder layer on new positions `at`: a slice (eager: attend to the cache up to its
        end) or a (1,) position tensor (static: attend to the whole cache under `key_mask`)."""
        layer, attn, w = state.layer, state.attn, state.weights
        batch, length, _ = h.shape
        q, k, v = w.qkv(layer.input_layernorm(h)).split(w.splits, dim=-1)
        q = attn.q_norm(q.view(batch, length, -1, attn.head_dim)).transpose(1, 2)
        k = attn.k_norm(k.view(batch, length, -1, attn.head_dim)).transpose(1, 2)
        v = v.view(batch, length, -1, attn.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        keys = _write(state.keys, apply_rotary(k, cos, sin), at)
        values = _write(state.values, v, at)
        bias = _write(state.bias, dynamic_bias(v, attn.dt_proj, attn.A), at)
        a = dma_attention(q, keys, values, bias, scaling=attn.scaling, keep_window=attn.keep_window_size,
                          key_mask=key_mask)
        h = torch.addcmul(w.o_proj(a.transpose(1, 2).reshape(batch, length, -1)), layer.input_residual, h)
        x = layer.post_attention_layernorm(h)
        if w.gate_up is None:
            mlp_out = layer.mlp(x)[0]
        else:
            gate, up = w.gate_up(x).chunk(2, dim=-1)
            mlp_out = w.down(layer.mlp.act_fn(gate) * up)
        return torch.addcmul(mlp_out, layer.post_attention_residual, h)


def _write(cache: torch.Tensor, new: torch.Tensor, at) -> torch.Tensor:
    """Store `new` at positions `at` (dim 2) and return the part of the cache to attend to."""
    if isinstance(at, slice):
        cache[:, :, at] = new
        return cache[:, :, : at.stop]
    cache.index_copy_(2, at, new)
    return cache


def _cuda_graph(step):
    """Run `step` once (warm-up on a side stream, as capture requires), capture it, return replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # recorded, not run: the state is still that after the warm-up step
    return graph.replay


def _cut_at_eos(out: torch.Tensor, prompt_len: int, eos_token_id: int | None) -> torch.Tensor:
    """What the eager loop returns: EOS after each row's first EOS, cut where every row has ended."""
    if eos_token_id is None:
        return out
    new = out[:, prompt_len:]
    ended = (new == eos_token_id).cumsum(dim=1) > 0
    out = torch.cat([out[:, :prompt_len], new.masked_fill(ended, eos_token_id)], dim=1)
    all_ended = ended.all(dim=0).nonzero()
    return out[:, : prompt_len + int(all_ended[0]) + 1] if len(all_ended) else out
