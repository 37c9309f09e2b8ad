"""Fast autoregressive decoding: `Decoder`, the public API over the decode step and its backends.

`model.generate` works (the model follows HF conventions), but its per-token bookkeeping costs far
more than the model itself at Doge sizes. `Decoder` runs the lean step of decode_step.py, per call
in one of three ways:

- eager: the step as plain PyTorch calls, one per token (sampling, prompts, past the window);
- static (cuda_graph.py): greedy decoding that fits in the window (prompt + new tokens <=
  keep_window_size) runs the fixed-shape step with the next token chosen inside it, captured once
  as a CUDA graph and replayed per token. `static="auto"` does this on CUDA; `static=True` runs the
  same loop without a graph anywhere (how CPU tests check it gives the same tokens);
- compiled (`compile=True`, compiled_step.py): each single-token step inside the window runs as the
  static step compiled by torch.compile, with the LM head left outside the graph so it can be a
  packed low-bit kernel. Greedy decoding with an fp32 LM head goes further: one compiled call runs
  CHUNK_TOKENS steps (step, LM head, argmax, the chosen token's embedding into the next step), so
  the compiled call's fixed cost (its Python wrapper, guard checks, reading the tokens back) is
  paid once per chunk, not per token; a last chunk runs past the tokens asked for into spare cache
  rows and its extra tokens are dropped. `compile_seconds` reports the time spent compiling.

`Decoder(model, weights="fp16" | "int8")` keeps the dense linear weights and the LM head in fewer
bytes for CPU decoding (`doge.model.lowbit`). The fbgemm kernels are not traceable, so a compiled
step keeps the layers' linears in float32 (for doge-20m they all are anyway: too small for the
low-bit kernels to pay off), and a low-bit LM head runs outside the graph, one compiled call per
token (no chunks). Weights are fused and packed when the Decoder is built; build a new one after
changing the model.
"""
from __future__ import annotations

import torch

from doge.model.compiled_step import CompiledStep, mark_dynamic
from doge.model.cuda_graph import decode_greedy
from doge.model.decode_step import DecodeCache, DecodeStep
from doge.model.modeling import DogeForCausalLM

CHUNK_TOKENS = 4  # compiled greedy decoding chooses this many tokens per compiled call


class Decoder(DecodeStep):
    """Greedy or sampled decoding for a `DogeForCausalLM`; prompt and output as (B, L) ids. The
    decode step it inherits (decode_step.py) does the maths; the Decoder picks the backend per call.

    static: "auto" (static step + CUDA graph for greedy decoding on CUDA when it fits the window),
    True (static step wherever it fits, no graph off CUDA) or False (always the eager step).
    weights: "fp32" (as the model holds them), "fp16" or "int8" (CPU, float32 model; see lowbit).
    compile: run single-token steps inside the window as the torch.compile'd static step.
    """

    def __init__(self, model: DogeForCausalLM, static: bool | str = "auto", weights: str = "fp32",
                 compile: bool = False):
        if static not in (True, False, "auto"):
            raise ValueError(f"static={static!r}: choose True, False or 'auto'")
        super().__init__(model, "fp32" if compile else weights, weights)
        self.static = static
        self.compiled = CompiledStep(self.static_hidden) if compile else None
        self.chunked = CompiledStep(self._chunk_body) if compile and self.lm_head.format == "fp32" else None

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling so far, the single step and the greedy chunk (0 when not compiling)."""
        return sum(c.seconds for c in (self.compiled, self.chunked) if c)

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
        cache = DecodeCache(self, input_ids.shape[0], slots, input_ids.device)
        if self.compiled:
            mark_dynamic(cache)
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
        """`logits`, with a single token inside the window run as the compiled static step when
        compiling."""
        if ids.shape[1] == 1 and self.compiled and cache.static:
            return self.lm_head(self.compiled(cache, ids, torch.tensor([start], device=ids.device)))
        return self.logits(cache, ids, start)

    def _chunk_body(self, cache, token, pos):
        """CHUNK_TOKENS greedy static steps from `token` (B, 1) at position `pos`, each feeding its
        argmax to the next, as (B, CHUNK_TOKENS) ids: compiled as one graph, the per-call costs
        (the compiled wrapper, its guard checks, reading the tokens back) are paid once a chunk."""
        tokens = []
        for i in range(CHUNK_TOKENS):
            token = self.greedy_token(cache, token, pos + i)
            tokens.append(token)
        return torch.cat(tokens, dim=1)

    def _use_static(self, capacity: int, device) -> bool:
        """The static step needs every position inside the window."""
        if self.static is False or (self.static == "auto" and device.type != "cuda"):
            return False
        return capacity <= self.config.keep_window_size

    def _generate_static(self, cache, out, first, prompt_len: int, eos_token_id: int | None):
        """Greedy decoding with the static step (cuda_graph.py), ended at EOS as the eager loop ends it."""
        new = decode_greedy(lambda token, pos: self.greedy_token(cache, token, pos), out, first, prompt_len,
                            eos_token_id)
        new, _ = _end_at_eos(new, torch.zeros_like(first, dtype=torch.bool), eos_token_id)
        return torch.cat([out[:, :prompt_len], new], dim=1)


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
