"""The Doge model: a decoder-only transformer with Dynamic Mask Attention and optional CDMoE.

Read top to bottom: norm, attention, decoder layer, model, causal-LM head. The DMA maths lives in
`doge/model/dma.py`, the CDMoE routing in `doge/model/cdmoe.py`, RoPE in `doge/model/rope.py`. Parameter names and
config keys are those of `transformers.DogeForCausalLM`, so weights move freely both ways.

Per layer:
    h = input_residual * h + DMA(RMSNorm(h))
    h = post_attention_residual * h + MLP(RMSNorm(h))     # MLP: dense SwiGLU or CDMoE

Used through the transformers APIs the classes behave as stock's: the cache is given as `cache`
or under its older name `past_key_values`, `use_cache` and `return_dict` default to the config,
hidden states, attentions and router logits are recorded by transformers' output-capturing hooks
(`_can_record_outputs`), and `attn_implementation` picks the fused DMA kernels ("sdpa", the
default) or the materialised scores that can return attention weights ("eager").
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from doge.model.cdmoe import DogeCDMoE, DogeMLP, load_balancing_loss
from doge.model.configuration import DogeConfig
from doge.model.dma import dma_attention, dynamic_bias, eager_dma_attention
from doge.model.loss import fused_causal_lm_loss
from doge.model.rope import DogeRotaryEmbedding, apply_rotary, head_dim_of


class DogeRMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back, then scaled (the stock order of operations)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class DogeAttention(nn.Module):
    """GQA attention with RoPE, per-head q/k RMSNorm and the dynamic mask (see doge/model/dma.py)."""

    def __init__(self, config: DogeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = head_dim_of(config)
        self.scaling = self.head_dim ** -0.5
        self.keep_window_size = config.keep_window_size
        heads, kv_heads, bias = config.num_attention_heads, config.num_key_value_heads, config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_heads * self.head_dim, bias=bias)
        self.A = nn.Parameter(torch.zeros(kv_heads))
        self.dt_proj = nn.Linear(kv_heads * self.head_dim, kv_heads, bias=bias)
        self.o_proj = nn.Linear(heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = DogeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = DogeRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, x, rotary, cache: Cache | None = None, key_mask=None, cache_position=None,
                static_cache: bool = False, document_ids=None):
        """Returns (output, attention weights or None: only the eager implementation has them).

        cache_position: absolute positions of the new tokens. With a static cache (fixed-length
        buffers) attention is causal by these positions, which hides the slots not yet filled.
        document_ids: (B, L) ids of the documents packed in each row: a token attends only to
        earlier tokens of its own document (see doge/model/dma.py), or None."""
        batch, length, _ = x.shape
        shape = (batch, length, -1, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(shape)).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:  # older transformers' static layers need the positions in cache_kwargs
            k, v = cache.update(k, v, self.layer_idx, {"cache_position": cache_position})
        bias = dynamic_bias(v, self.dt_proj, self.A)
        kwargs = dict(scaling=self.scaling, keep_window=self.keep_window_size, key_mask=key_mask,
                      query_positions=cache_position if static_cache else None, document_ids=document_ids)
        weights = None
        if self.config._attn_implementation == "eager":
            out, weights = eager_dma_attention(q, k, v, bias, **kwargs)
        else:
            out = dma_attention(q, k, v, bias, **kwargs)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), weights


class DogeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DogeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = DogeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = DogeAttention(config, layer_idx)
        self.input_residual = nn.Parameter(torch.ones(config.hidden_size))
        self.post_attention_layernorm = DogeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = DogeCDMoE(config) if config.is_moe else DogeMLP(config)
        self.post_attention_residual = nn.Parameter(torch.ones(config.hidden_size))
        self.hidden_dropout = config.hidden_dropout

    def forward(self, h, rotary, cache=None, key_mask=None, cache_position=None, static_cache=False,
                document_ids=None):
        """Returns (hidden states, router logits or None, attention weights or None). The layer is
        where all three are captured (`_can_record_outputs`): a hook inside it would stop a
        layer compiled as one graph."""
        attn, weights = self.self_attn(self.input_layernorm(h), rotary, cache, key_mask, cache_position, static_cache,
                                       document_ids)
        h = self.input_residual * h + F.dropout(attn, self.hidden_dropout, self.training)
        mlp_out, router_logits = self.mlp(self.post_attention_layernorm(h)), None
        if isinstance(mlp_out, tuple):
            mlp_out, router_logits = mlp_out
        h = self.post_attention_residual * h + F.dropout(mlp_out, self.hidden_dropout, self.training)
        return h, router_logits, weights


class DogePreTrainedModel(PreTrainedModel):
    config_class = DogeConfig
    config: DogeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DogeDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False  # the sparse path (sequences past keep_window_size) reads ranks on the host
    _supports_attention_backend = False
    _can_record_outputs = {
        "router_logits": OutputRecorder(DogeDecoderLayer, index=1),
        "hidden_states": DogeDecoderLayer,
        "attentions": OutputRecorder(DogeDecoderLayer, index=2),
    }

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        """transformers guesses this from the module source; the attention here reads
        `config._attn_implementation` on every call, so switching it always works."""
        return True

    def _init_weights(self, module):
        """Stock init (normal(0.02) for Linear/Embedding, ones for norms); A = 0, residuals = 1."""
        super()._init_weights(module)
        if isinstance(module, DogeAttention):
            init.zeros_(module.A)
        elif isinstance(module, DogeDecoderLayer):
            init.ones_(module.input_residual)
            init.ones_(module.post_attention_residual)


def _key_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The 2-D padding mask as bool, or None. Whether it pads anything is not checked: that would
    read the tensor back to the host (a sync, and a data-dependent branch torch.export rejects)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask.bool()


# Newer transformers name the cache `cache` (in model outputs too) and deprecate `past_key_values`.
CACHE_RENAMED = "cache" in MoeModelOutputWithPast.__dataclass_fields__


def _one_cache(cache: Cache | None, past_key_values: Cache | None, caller: str) -> Cache | None:
    """The cache under either name. Where transformers renamed it, the old name warns as stock's
    models do (a FutureWarning, which tools and test suites check for; a log line is not seen)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    if past_key_values is not None and CACHE_RENAMED:
        warnings.warn(f"`past_key_values` is deprecated for `{caller}.forward`; pass the cache as `cache`",
                      FutureWarning, stacklevel=3)
    return cache if cache is not None else past_key_values


class DogeModel(DogePreTrainedModel):
    def __init__(self, config: DogeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DogeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DogeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DogeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, cache_position=None, past_key_values=None,
                document_ids=None, **kwargs) -> MoeModelOutputWithPast:
        """Final hidden states and the cache; `use_cache` defaults to the config's, as in stock.

        `document_ids` (B, L), for rows packed from several documents: a token attends only to
        earlier tokens of its own document (a run of equal ids); None attends over the whole row.
        Positions stay `position_ids` (restart them per document to make each one start at 0)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        cache = _one_cache(cache, past_key_values, type(self).__name__)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if cache_position is None:  # a tensor for static caches: no host sync
            past = cache.get_seq_length() if cache is not None else 0
            cache_position = torch.arange(h.shape[1], device=h.device) + past
        if position_ids is None:
            position_ids = cache_position[None]
        rotary = self.rotary_emb(h, position_ids)
        static = cache is not None and cache.is_compileable
        key_mask = _key_mask(attention_mask)
        for layer in self.layers:
            h = layer(h, rotary, cache, key_mask, cache_position, static, document_ids)[0]
        # Positional: the cache field is `cache` in newer transformers, `past_key_values` before.
        return MoeModelOutputWithPast(self.norm(h), cache)


class DogeLMHead(nn.Linear):
    """The output projection; called with labels it returns the fused chunked loss instead of
    logits (see doge/model/loss.py). Being a module call, ZeRO-3 gathers its weight as usual."""

    def forward(self, hidden, labels=None, num_items_in_batch=None):
        if labels is None:
            return super().forward(hidden)
        return fused_causal_lm_loss(hidden, self.weight, labels, num_items_in_batch)


class DogeForCausalLM(DogePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: DogeConfig):
        super().__init__(config)
        self.model = DogeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = DogeLMHead(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                output_router_logits=None, past_key_values=None, skip_logits=False,
                **kwargs) -> MoeCausalLMOutputWithPast:
        """Logits, and with `labels` the shifted next-token loss (+ router aux loss when asked).

        `skip_logits=True` (training) computes the loss fused with the LM head, chunk by chunk,
        and returns no logits: much less memory traffic than materialising (B, L, vocab).
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        output_router_logits = output_router_logits and self.config.is_moe
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=_one_cache(cache, past_key_values, type(self).__name__),
                             inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_router_logits=output_router_logits, **kwargs)
        h = outputs.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else h[:, logits_to_keep]
        logits = loss = None
        if skip_logits and labels is not None:
            loss = self.lm_head(h, labels, kwargs.get("num_items_in_batch"))
        else:
            logits = self.lm_head(h)
            if labels is not None:
                loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits:
            mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            aux_loss = load_balancing_loss(outputs.router_logits, self.config.num_experts,
                                           self.config.num_experts_per_tok, mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        # Positional: the cache field is `cache` in newer transformers, `past_key_values` before.
        cache = outputs.get("cache", outputs.get("past_key_values"))
        return MoeCausalLMOutputWithPast(loss, aux_loss, logits, cache, outputs.hidden_states,
                                         outputs.attentions, outputs.router_logits)

    @staticmethod
    def create_masks_for_generate(config, inputs_embeds, attention_mask, *args, **kwargs):
        """`generate` with a static cache: keep the 2-D padding mask. The attention masks the empty
        cache slots itself (causal by cache position), so no 4-D mask is materialised per step."""
        return attention_mask


class DogeForSequenceClassification(GenericForSequenceClassification, DogePreTrainedModel):
    """Last-token classification head on `DogeModel`, as stock's."""
