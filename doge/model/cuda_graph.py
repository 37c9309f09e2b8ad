"""The CUDA graph backend: greedy decoding with the static step replayed as one captured graph.

Decoding a small model on a GPU is launch-bound: a step is hundreds of kernel launches from
Python. The static step (decode_step.py) has fixed shapes and reads its position and token from
device tensors, so it is captured once as a CUDA graph and each token costs one graph launch. Off
CUDA (`Decoder(static=True)`) the same loop runs the step as plain calls, which is how CPU tests
check it gives the eager loop's tokens.
"""
from __future__ import annotations

import torch

EOS_CHECK_EVERY = 16  # static decoding reads the tokens back (a device sync) this often to stop at EOS


def decode_greedy(next_token, out: torch.Tensor, first: torch.Tensor, prompt_len: int,
                  eos_token_id: int | None) -> torch.Tensor:
    """Greedy tokens into `out` (B, capacity) from position prompt_len on, `first` (B,) there and
    each next one `next_token(token (B, 1), pos (1,))` -> (B, 1), replayed as a CUDA graph on
    CUDA. Returns the tokens chosen, (B, n): every position up to capacity, or fewer once every
    row holds EOS (checked every EOS_CHECK_EVERY tokens; the caller cuts at the exact step)."""
    capacity, device = out.shape[1], out.device
    out[:, prompt_len] = first
    pos = torch.tensor([prompt_len], device=device)
    token = first[:, None].clone()

    def step():
        nxt = next_token(token, pos)
        out.index_copy_(1, pos + 1, nxt)
        token.copy_(nxt)
        pos.add_(1)

    remaining, done = capacity - prompt_len - 1, 0  # tokens still to generate after `first`
    run = step
    if device.type == "cuda" and remaining:
        run, done = _capture(step), 1  # capturing ran the first step
    while done < remaining:
        if eos_token_id is not None and done % EOS_CHECK_EVERY == 0 and \
                bool((out[:, prompt_len: prompt_len + done + 1] == eos_token_id).any(dim=1).all()):
            break
        run()
        done += 1
    return out[:, prompt_len: prompt_len + done + 1]


def _capture(step):
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
