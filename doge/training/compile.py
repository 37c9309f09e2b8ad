"""`torch.compile` for training: every decoder layer and the fused LM-head loss as graphs.

On a GPU an eager Doge step is set by launches and elementwise chains (dtype copies, RMSNorm and
the residual scales, RoPE, the DMA bias, SwiGLU), not by its matmuls; inductor fuses those
chains. The unit compiled is a decoder layer's `forward` (and the LM head's), not the whole model:
- DeepSpeed's module hooks (ZeRO-3 gathers a module's parameters before its call) run around the
  compiled function, not inside a graph;
- the layers share their code and differ only in their parameters, which dynamo passes as graph
  inputs, so one compilation serves all of them and compile time is one layer's;
- the layer is also where transformers' output recorders hook in (router logits for the CDMoE
  load-balancing loss, hidden states), so capturing outputs stays outside the graph.

Variable-length micro-batches (chat rows cut to their longest target) mark the sequence
dimension dynamic, so one layer graph serves every length instead of one compilation per length
(except where the sparse DMA path runs over more than one chunk of queries: past QUERY_CHUNK
queries and the keep window, a new length compiles anew).
The LM head then stays eager: its loss loops over chunks of tokens, a count dynamo would fix per
length, and its time is two GEMMs per chunk either way.
"""
from __future__ import annotations

from types import MethodType

import torch

from doge.model.modeling import DogeDecoderLayer, DogeForCausalLM, DogeLMHead


def compile_wanted(mode: str, device_type: str) -> bool:
    """`auto`: on for CUDA; off on CPU, where the step is bound by its GEMMs and a cold compile
    (about a minute for doge-20m) costs more than it saves in a short run."""
    return mode == "on" or (mode == "auto" and device_type == "cuda")


def _length_marked(forward):
    """`forward` of a decoder layer with the sequence dimension of its inputs marked dynamic."""
    def call(layer, h, rotary, cache=None, key_mask=None, cache_position=None, static_cache=False,
             document_ids=None):
        for tensor, dim in ((h, 1), (rotary[0], 1), (rotary[1], 1), (cache_position, 0), (document_ids, 1)):
            if tensor is not None:
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        return forward(layer, h, rotary, cache, key_mask, cache_position, static_cache, document_ids)
    return call


def compile_model(model: DogeForCausalLM, dynamic_length: bool = False, fullgraph: bool = True) -> None:
    """In place: each decoder layer runs compiled (one compiled function shared by all), and the
    LM head unless `dynamic_length` (the micro-batches vary in length). `fullgraph`: a graph
    break is an error instead of a silent fall back to eager for part of the layer."""
    layer_forward = torch.compile(DogeDecoderLayer.forward, fullgraph=fullgraph)
    if dynamic_length:
        layer_forward = _length_marked(layer_forward)
    for layer in model.model.layers:
        layer.forward = MethodType(layer_forward, layer)
    if not dynamic_length:
        model.lm_head.forward = MethodType(torch.compile(DogeLMHead.forward, fullgraph=fullgraph), model.lm_head)
