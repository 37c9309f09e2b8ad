"""Fast autoregressive decoding with a preallocated KV cache.

`model.generate` works (the model follows HF conventions), but its per-token bookkeeping costs far
more than the model itself at Doge sizes. `Decoder` keeps the per-token path short: one fused
q/k/v matmul and one fused gate/up matmul per layer (weights concatenated once, at start), one norm
call for all q and k heads, rope rows looked up from a table made once per generation, keys,
values and DMA biases written in place into preallocated buffers kept in the folded form the DMA
kernel attends to (no per-token concatenation of the cache), query heads grouped under their KV
head (no per-token repeat of the cache), and the DMA attention itself from `doge.model.dma` for
prompts and past the window (so the sparse window applies once the context passes keep_window_size).

Greedy decoding that fits in the window (prompt + new tokens <= keep_window_size) can also run as
a *static* step: fixed shapes (attention over the whole preallocated cache, later positions masked
out), position and token read from and written to device tensors, the next token chosen inside
the step. On CUDA that step is captured once as a CUDA graph and replayed per token, so a token
costs one graph launch instead of hundreds of kernel launches from Python (decoding a small model
on a GPU is launch-bound). `Decoder(model, static="auto")` does this on CUDA; `static=True` runs
the same step without a graph anywhere (how CPU tests check it gives the same tokens).

On a CPU the eager step is bound by op dispatch (tens of small ops per layer, microseconds each),
not by weight bytes. `Decoder(model, compile=True)` runs each single-token step as the static step
compiled by torch.compile (inductor: the norms, rotary, bias and cache writes fuse into a few C++
kernels), with the LM head left outside the graph so it can be a packed low-bit kernel. Greedy
decoding with an fp32 LM head goes further: one compiled call runs CHUNK_TOKENS steps (step, LM
head, argmax, the chosen token's embedding into the next step), so the compiled call's fixed cost
(its Python wrapper, guard checks, reading the tokens back) is paid once per chunk, not per token;
a last chunk runs past the tokens asked for into spare cache rows and its extra tokens are dropped.
Compiling costs tens of seconds, so the graphs are compiled once per batch size with the number of
cache slots symbolic: one graph serves every generation length inside the window, and a step
attends over the slots this generation needs, not a rounded-up cache (at one query per layer the
attention is bound by reading the cache, which the weights have evicted from the CPU's caches).
`compile_seconds` reports the time spent. Where compiling fails (no C compiler, an unsupported op)
the Decoder warns once and stays eager.

`Decoder(model, weights="fp16" | "int8")` keeps the dense linear weights and the LM head in fewer
bytes for CPU decoding (`doge.model.lowbit`): batch-1 decoding reads every weight once per token.
The fbgemm kernels are not traceable, so a compiled step keeps the layers' linears in float32
(for doge-20m they all are anyway: too small for the low-bit kernels to pay off), and a low-bit LM
head runs outside the graph, one compiled call per token (no chunks).
Weights are fused and packed when the Decoder is built; build a new one after changing the model.
"""
from __future__ import annotations

import time
import warnings

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


EOS_CHECK_EVERY = 16  # static decoding reads the tokens back (a device sync) this often to stop at EOS
CHUNK_TOKENS = 4  # compiled greedy decoding chooses this many tokens per compiled call


class Decoder:
    """Greedy or sampled decoding for a `DogeForCausalLM`; prompt and output as (B, L) ids.

    static: "auto" (static step + CUDA graph for greedy decoding on CUDA when it fits the window),
    True (static step wherever it fits, no graph off CUDA) or False (always the eager step).
    weights: "fp32" (as the model holds them), "fp16" or "int8" (CPU, float32 model; see lowbit).
    compile: run single-token steps inside the window as the torch.compile'd static step.
    """

    def __init__(self, model: DogeForCausalLM, static: bool | str = "auto", weights: str = "fp32",
                 compile: bool = False):
        if static not in (True, False, "auto"):
            raise ValueError(f"static={static!r}: choose True, False or 'auto'")
        self.model = model.eval()
        self.config = model.config
        self.dtype = model.dtype
        self.static = static
        with torch.no_grad():
            self.layer_weights = [_Weights(layer, "fp32" if compile else weights) for layer in model.model.layers]
            self.lm_head = PackedLinear(model.lm_head.weight, weights)
        self.embed, self.norm = model.model.embed_tokens.weight, model.model.norm.weight
        self.eps = model.model.norm.eps
        self.compiled = _Compiled(self._static_body) if compile else None
        self.chunked = _Compiled(self._chunk_body) if compile and self.lm_head.format == "fp32" else None

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far, the single step and the greedy chunk (0 when not compiling)."""
        return sum(c.seconds for c in (self.compiled, self.chunked) if c)

    def bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: the linears as stored, every other parameter as the
        model holds it, except the input embedding, of which a step reads one row per token (tied,
        that matrix is the LM head and counted as such)."""
        linears = [linear for w in self.layer_weights for linear in w.linears] + [self.lm_head]
        replaced = {id(p) for w in self.layer_weights for p in w.replaced} | {id(self.model.lm_head.weight)}
        rest = [p for p in self.model.parameters() if id(p) not in replaced and p is not self.embed]
        return sum(linear.nbytes for linear in linears) + sum(p.nbytes for p in rest)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt followed by up to `max_new_tokens` tokens (stops early once every row hit EOS)."""
        batch, prompt_len = input_ids.shape
        capacity = prompt_len + max_new_tokens
        cache, logits = self._prefill(input_ids, capacity, temperature)
        out = torch.empty(batch, capacity, dtype=torch.long, device=input_ids.device)
        out[:, :prompt_len] = input_ids
        if temperature <= 0 and self._use_static(capacity, input_ids.device):
            return self._generate_static(cache, out, logits.argmax(-1), prompt_len, eos_token_id)
        pos = prompt_len
        for chunk in self._chunks(cache, logits, prompt_len, capacity, temperature, eos_token_id, generator):
            out[:, pos: pos + chunk.shape[1]] = chunk
            pos += chunk.shape[1]
        return out[:, :pos]

    @torch.inference_mode()
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
               eos_token_id: int | None = None, generator: torch.Generator | None = None):
        """Yield each new token, (B,) ids, as soon as it is chosen (for printing as it goes; compiled
        greedy decoding chooses CHUNK_TOKENS at a time); the same tokens as `generate`."""
        capacity = input_ids.shape[1] + max_new_tokens
        cache, logits = self._prefill(input_ids, capacity, temperature)
        for chunk in self._chunks(cache, logits, input_ids.shape[1], capacity, temperature, eos_token_id, generator):
            yield from chunk.unbind(1)

    @torch.inference_mode()
    def forced_logits(self, input_ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """(B, L - prompt_len + 1, V) float32 logits of the decode steps along given ids (teacher
        forcing): how reduced-precision weights are compared with fp32 on the same path."""
        cache, logits = self._prefill(input_ids[:, :prompt_len], input_ids.shape[1])
        steps = [logits] + [self._step(cache, input_ids[:, pos: pos + 1], pos)
                            for pos in range(prompt_len, input_ids.shape[1])]
        return torch.stack(steps, dim=1).float()

    def _prefill(self, input_ids: torch.Tensor, capacity: int, temperature: float = 0.0):
        """Cache buffers for `capacity` positions (with room for the positions a last greedy chunk
        runs past the end; compiled: slot count symbolic), filled with the prompt; the last prompt
        logits."""
        slots = capacity + (CHUNK_TOKENS - 1 if self._chunking(capacity, temperature) else 0)
        cache = _Cache(self, input_ids.shape[0], slots, input_ids.device)
        if self.compiled:
            cache.mark_dynamic()
        return cache, self._step(cache, input_ids, 0)

    def _chunking(self, capacity: int, temperature: float) -> bool:
        """Compiled greedy decoding with an fp32 LM head runs CHUNK_TOKENS steps per compiled call
        when every position a chunk writes fits in the window (else it steps per token)."""
        return bool(self.chunked) and temperature <= 0 and \
            capacity + CHUNK_TOKENS - 1 <= self.config.keep_window_size

    def _chunks(self, cache, logits, prompt_len: int, capacity: int, temperature, eos_token_id, generator):
        """New tokens as (B, n) chunks: CHUNK_TOKENS per compiled call where `_chunking`, else one."""
        if not self._chunking(capacity, temperature):
            tokens = self._tokens(cache, logits, prompt_len, capacity, temperature, eos_token_id, generator)
            yield from (token[:, None] for token in tokens)
            return
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        chunk, pos = logits.argmax(-1, keepdim=True), prompt_len
        while True:
            chunk, done = _end_at_eos(chunk, done, eos_token_id)
            yield chunk
            pos += chunk.shape[1]
            if pos == capacity or bool(done.all()):
                return
            last = chunk[:, -1:].clone(memory_format=torch.contiguous_format)  # the strides the graph was made for
            chunk = self.chunked(cache, last, torch.tensor([pos - 1], device=chunk.device))
            chunk = chunk[:, : capacity - pos]

    def _tokens(self, cache, logits, prompt_len: int, capacity: int, temperature, eos_token_id, generator):
        """Eager decoding: rows that hit EOS repeat it; stops at capacity or when every row is done."""
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        for pos in range(prompt_len, capacity):
            token = self._pick(logits, temperature, generator)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done |= token == eos_token_id
            yield token
            if pos + 1 == capacity or (eos_token_id is not None and bool(done.all())):
                return
            logits = self._step(cache, token[:, None], pos)

    @staticmethod
    def _pick(logits, temperature, generator):
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def _step(self, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run `ids` (B, n) at positions start..start+n-1; return the last position's logits. One
        token reads its rope row from the table; several get one rotary call, as the model's forward."""
        stop = start + ids.shape[1]
        if ids.shape[1] == 1 and self.compiled and cache.static:
            return self.lm_head(self.compiled(cache, ids, torch.tensor([start], device=ids.device)))
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

    def _static_body(self, cache, token, pos):
        """`_hidden` for one token per row at position `pos`, a (1,) tensor, attending to the whole
        cache under a causal mask: fixed shapes, what CUDA graphs and torch.compile take."""
        cos, sin = cache.cos.index_select(0, pos), cache.sin.index_select(0, pos)
        key_mask = (cache.positions <= pos).expand(token.shape[0], -1)
        return self._hidden(cache, token, cos, sin, pos, key_mask)

    def _chunk_body(self, cache, token, pos):
        """CHUNK_TOKENS greedy static steps from `token` (B, 1) at position `pos`, each feeding its
        argmax to the next, as (B, CHUNK_TOKENS) ids: compiled as one graph, the per-call costs
        (the compiled wrapper, its guard checks, reading the tokens back) are paid once a chunk."""
        tokens = []
        for i in range(CHUNK_TOKENS):
            token = self.lm_head(self._static_body(cache, token, pos + i)).argmax(-1, keepdim=True)
            tokens.append(token)
        return torch.cat(tokens, dim=1)

    def _use_static(self, capacity: int, device) -> bool:
        """The static step needs every position inside the window."""
        if self.static is False or (self.static == "auto" and device.type != "cuda"):
            return False
        return capacity <= self.config.keep_window_size

    def _generate_static(self, cache, out, first, prompt_len: int, eos_token_id: int | None):
        """Greedy decoding with the static step, replayed as a CUDA graph on CUDA."""
        batch, capacity = out.shape
        device = out.device
        out[:, prompt_len] = first
        pos = torch.tensor([prompt_len], device=device)
        token = first[:, None].clone()

        def step():
            nxt = self.lm_head(self._static_body(cache, token, pos)).argmax(-1)
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
        new, _ = _end_at_eos(out[:, prompt_len: prompt_len + done + 1], torch.zeros_like(first, dtype=torch.bool),
                             eos_token_id)
        return torch.cat([out[:, :prompt_len], new], dim=1)


class _Cache:
    """What one generation writes and looks up per token: each layer's buffers, and the rope rows
    of every position as a single-token step at that position computes them (x * cos +
    rotate_half(x) * sin = x * cos + x.roll(D/2) * sin with the sign folded into sin's first half).
    Length-dependent rope types scale with a call's last position, so they take one call per row."""

    def __init__(self, decoder: Decoder, batch: int, capacity: int, device):
        self.layers = [_Layer(w, batch, capacity, decoder.dtype, device) for w in decoder.layer_weights]
        self.static = capacity <= decoder.config.keep_window_size  # the static step can attend to it all
        rotary = decoder.model.model.rotary_emb
        self.positions = positions = torch.arange(capacity, device=device)
        rows = [positions] if rotary.rope_type == "default" else positions.split(1)
        tables = [_rope(rotary, p, decoder.dtype) for p in rows]
        self.cos, self.sin = (torch.cat(t) for t in zip(*tables))

    def mark_dynamic(self) -> None:
        """Make the slot count a symbolic size for torch.compile: one graph for every cache size."""
        for state in self.layers:
            torch._dynamo.mark_dynamic(state.keys, 2)
            torch._dynamo.mark_dynamic(state.values, 2)
        for table in (self.positions, self.cos, self.sin):
            torch._dynamo.mark_dynamic(table, 0)


class _Compiled:
    """A static function (the single step or the greedy chunk) compiled by torch.compile, one graph
    per batch size (the cache's slot count is symbolic, see `_Cache.mark_dynamic`); the first call
    of each compiles it and is timed. Falls back to the eager function for good when compiling
    fails."""

    def __init__(self, fn):
        self.fn, self.seconds, self.shapes = fn, 0.0, set()
        # cpp_wrapper: the graph's kernels are called from C++, not one Python call each (~6% faster)
        self.compiled = torch.compile(fn, fullgraph=True, options={"cpp_wrapper": True})

    def __call__(self, cache, token, pos):
        if self.compiled is None:
            return self.fn(cache, token, pos)
        shape, start = tuple(token.shape), time.perf_counter()
        try:
            out = self.compiled(cache, token, pos)
        except Exception as err:  # whatever the compiler raised: decode eagerly instead
            warnings.warn(f"torch.compile of the decode step failed, decoding eagerly: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}", RuntimeWarning)
            self.compiled = None
            return self.fn(cache, token, pos)
        if shape not in self.shapes:
            self.shapes.add(shape)
            self.seconds += time.perf_counter() - start
        return out


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


def _end_at_eos(new: torch.Tensor, done: torch.Tensor, eos_token_id: int | None):
    """New tokens (B, n) as the eager loop gives them, with `done` (B,) the rows that had already
    ended: EOS from each row's first EOS on, cut after the step where every row has ended; and the
    rows ended after it."""
    if eos_token_id is None:
        return new, done
    ended = done[:, None] | ((new == eos_token_id).cumsum(dim=1) > 0)
    all_ended = ended.all(dim=0).nonzero()
    stop = int(all_ended[0]) + 1 if len(all_ended) else new.shape[1]
    return new.masked_fill(ended, eos_token_id)[:, :stop], ended[:, stop - 1]
