"""The compiled backend: a static function of the decode step (decode_step.py) run by torch.compile.

On a CPU the eager step is bound by op dispatch (tens of small ops per layer, microseconds each),
not by weight bytes. Compiled by torch.compile (inductor), the static step's norms, rotary, bias
and cache writes fuse into a few C++ kernels. Compiling costs tens of seconds, so a function is
compiled once per batch size with the number of cache slots symbolic (`mark_dynamic`): one graph
serves every generation length inside the window, and a step attends over the slots this
generation needs, not a rounded-up cache (at one query per layer the attention is bound by reading
the cache, which the weights have evicted from the CPU's caches). Where compiling fails (no C
compiler, an unsupported op) the step warns once and stays eager.
"""
from __future__ import annotations

import time
import warnings

import torch

from doge.model.decode_step import DecodeCache


class CompiledStep:
    """A static function (the single step or the greedy chunk) compiled by torch.compile, one graph
    per batch size (the cache's slot count is symbolic, see `mark_dynamic`); the first call of each
    compiles it and is timed in `seconds`. Falls back to the eager function for good when compiling
    fails."""

    def __init__(self, fn):
        self.fn, self.seconds, self.shapes = fn, 0.0, set()
        # cpp_wrapper: the graph's kernels are called from C++, not one Python call each (~6% faster)
        self.compiled = torch.compile(fn, fullgraph=True, options={"cpp_wrapper": True})

    def __call__(self, cache: DecodeCache, token, pos):
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


def mark_dynamic(cache: DecodeCache) -> None:
    """Make the cache's slot count a symbolic size for torch.compile: one graph for every cache size."""
    for state in cache.layers:
        torch._dynamo.mark_dynamic(state.keys, 2)
        torch._dynamo.mark_dynamic(state.values, 2)
    for table in (cache.positions, cache.cos, cache.sin):
        torch._dynamo.mark_dynamic(table, 0)
