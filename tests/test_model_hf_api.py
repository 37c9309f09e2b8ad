"""Used through the transformers APIs, ours behaves as the stock `transformers.DogeForCausalLM`
(same weights, float32): caches, defaults, output types, captured outputs, export, RoPE types."""
import inspect
import warnings

import pytest
import torch
import transformers
from conftest import distinct_tokens, randomize_extras, stock_twin, tiny_config
from transformers import StaticCache
from transformers.cache_utils import Cache

from doge import DogeForCausalLM

WINDOWS = {"fast": 2048, "sparse": 8}  # sparse: the 14-token context passes keep_window_size
GREEDY = dict(do_sample=False, pad_token_id=0)


def _ids(batch=2, length=14, seed=0):
    return distinct_tokens(batch, length, 256, seed=seed)


def _padded(ids):
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return mask


@pytest.mark.parametrize("path", WINDOWS)
def test_static_cache_prefill_and_decode_equal_no_cache(pair, path):
    """Static caches hand back their whole fixed-length buffers; the empty slots must stay unseen
    (attending to them moves the logits by ~0.8 here). Stock's initializer_range keeps the logits
    O(1), so 1e-5 is ~100 float32 ulps rather than the ~10 it would be at the O(10) logits of
    tiny_config's 0.2 (where a decode step and a full forward already differ by 7e-6 in stock)."""
    ours, stock = pair(seed=31, keep_window_size=WINDOWS[path], initializer_range=0.02)
    x = _ids()
    with torch.no_grad():
        full = ours(x, use_cache=False).logits
        prefill = ours(x, cache=StaticCache(config=ours.config, max_cache_len=24)).logits
        cache = StaticCache(config=ours.config, max_cache_len=24)
        steps = [ours(x[:, :9], cache=cache).logits] + [ours(x[:, t:t + 1], cache=cache).logits for t in range(9, 14)]
        assert (full - stock(x).logits).abs().max() <= 1e-4
    assert (prefill - full).abs().max() <= 1e-5
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-5


@pytest.mark.parametrize("path", WINDOWS)
def test_generate_with_static_cache_gives_greedy_tokens(pair, path):
    ours, stock = pair(seed=32, keep_window_size=WINDOWS[path])
    x = _ids(seed=32)
    mask = _padded(x)
    with torch.no_grad():
        greedy = ours.generate(x, attention_mask=mask, max_new_tokens=10, **GREEDY)
        static = ours.generate(x, attention_mask=mask, max_new_tokens=10, cache_implementation="static", **GREEDY)
        if path == "fast":  # stock's own top-k window is not tie-stable over generated (repeated) tokens
            assert torch.equal(stock.generate(x, attention_mask=mask, max_new_tokens=10, **GREEDY), greedy)
    assert torch.equal(static, greedy)


def _close(a, b, tol=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x - y).abs().max() <= tol


def test_hidden_states_equal_stock(pair):
    ours, stock = pair(seed=33)
    x = _ids(seed=33)
    with torch.no_grad():
        a, b = ours(x, output_hidden_states=True), stock(x, output_hidden_states=True)
        _close(a.hidden_states, b.hidden_states)
        assert len(a.hidden_states) == ours.config.num_hidden_layers + 1
        kwargs = dict(max_new_tokens=4, return_dict_in_generate=True, output_hidden_states=True, **GREEDY)
        ga, gb = ours.generate(x, **kwargs), stock.generate(x, **kwargs)
    assert torch.equal(ga.sequences, gb.sequences)
    for step_a, step_b in zip(ga.hidden_states, gb.hidden_states, strict=True):
        _close(step_a, step_b)


def test_assisted_decoding_with_hidden_states_matches_stock(pair):
    ours, stock = pair(seed=34)
    torch.manual_seed(34)
    assistant = DogeForCausalLM(tiny_config(num_hidden_layers=1)).eval()
    x = _ids(batch=1, seed=34)
    kwargs = dict(max_new_tokens=6, return_dict_in_generate=True, output_hidden_states=True, **GREEDY)
    with torch.no_grad():
        a = ours.generate(x, assistant_model=assistant, **kwargs)
        b = stock.generate(x, assistant_model=stock_twin(assistant), **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.hidden_states) == len(b.hidden_states)


def test_base_model_takes_past_key_values(pair):
    ours, stock = pair(seed=35)
    x = _ids(seed=35)
    with torch.no_grad():
        for model in (ours.model, stock.model):
            full = model(x).last_hidden_state
            past = model(x[:, :10], use_cache=True).past_key_values
            step = model(x[:, 10:], past_key_values=past).last_hidden_state
            assert (step - full[:, 10:]).abs().max() <= 1e-5
        assert (ours.model(x).last_hidden_state - stock.model(x).last_hidden_state).abs().max() <= 1e-4


def test_use_cache_defaults_to_the_config(pair):
    ours, stock = pair(seed=36)
    x = _ids(seed=36)
    with torch.no_grad():
        for model in (ours, stock, ours.model, stock.model):
            assert isinstance(model(x).past_key_values, Cache)
            assert model(x, use_cache=False).past_key_values is None
        ours.config.use_cache = stock.config.use_cache = False
        assert ours(x).past_key_values is None and stock(x).past_key_values is None


def test_return_dict_false_gives_stock_tuples(pair):
    ours, stock = pair(seed=37)
    x = _ids(seed=37)
    with torch.no_grad():
        for a, b in ((ours(x, return_dict=False), stock(x, return_dict=False)),
                     (ours.model(x, return_dict=False), stock.model(x, return_dict=False))):
            assert isinstance(a, tuple) and [type(t) for t in a] == [type(t) for t in b]
            assert (a[0] - b[0]).abs().max() <= 1e-4


def test_torch_export_with_attention_mask_matches_eager(pair):
    ours, _ = pair(seed=38)
    x = _ids(seed=38)
    kwargs = dict(input_ids=x, attention_mask=_padded(x), use_cache=False)
    with torch.no_grad():
        exported = torch.export.export(ours, (), kwargs).module()
        assert (exported(**kwargs).logits - ours(**kwargs).logits).abs().max() <= 1e-5


ROPES = {
    "linear": dict(rope_type="linear", factor=2.0),
    "yarn": dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=256),
    "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "longrope": dict(rope_type="longrope", short_factor=[1.0] * 8, long_factor=[3.0] * 8, factor=4.0,
                     original_max_position_embeddings=32),
}


@pytest.mark.parametrize("rope", ROPES)
def test_rope_types_match_stock(pair, rope):
    """Sequences past original_max_position_embeddings (longrope switches to its long factors)."""
    ours, stock = pair(seed=39, rope_parameters={**ROPES[rope], "rope_theta": 10000.0}, max_position_embeddings=128)
    x = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(39))
    with torch.no_grad():
        assert (ours(x).logits - stock(x).logits).abs().max() <= 1e-4
        position_ids = torch.arange(60)[None]
        for a, b in zip(ours.model.rotary_emb(ours.model.embed_tokens(x), position_ids),
                        stock.model.rotary_emb(stock.model.embed_tokens(x), position_ids)):
            assert (a - b).abs().max() <= 1e-6
    assert list(inspect.signature(ours.model.rotary_emb.forward).parameters) == \
        list(inspect.signature(stock.model.rotary_emb.forward).parameters)


@pytest.mark.parametrize("rope", ["default", "dynamic", *ROPES])
def test_rope_inv_freq_buffer_is_stocks(pair, rope, tmp_path):
    """Tools (transformers' own test suite among them) read and scale `rotary_emb.inv_freq`: a
    tensor buffer equal to stock's when built, when loaded by from_pretrained, and after a call
    past max positions (where dynamic NTK and longrope change it)."""
    params = {**ROPES.get(rope, {"rope_type": rope, "factor": 4.0}), "rope_theta": 10000.0}
    ours, stock = pair(seed=40, rope_parameters=params, max_position_embeddings=32)
    a, b = ours.model.rotary_emb, stock.model.rotary_emb
    assert {"inv_freq", "original_inv_freq"} <= {name for name, _ in a.named_buffers()}
    for name in ("inv_freq", "original_inv_freq"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=0)
    torch.testing.assert_close(a.inv_freq * 0.5, b.inv_freq * 0.5, rtol=1e-6, atol=0)
    ours.save_pretrained(tmp_path)
    loaded = DogeForCausalLM.from_pretrained(tmp_path).model.rotary_emb
    torch.testing.assert_close(loaded.inv_freq, b.inv_freq, rtol=1e-6, atol=0)
    x, long_positions = torch.zeros(1, 48, 8), torch.arange(48)[None]
    with torch.no_grad():
        a(x, long_positions), b(x, long_positions)
    torch.testing.assert_close(a.inv_freq, b.inv_freq, rtol=1e-6, atol=0)


def test_past_key_values_warns_where_stock_does(pair):
    """Where transformers renamed the cache argument, the old name raises stock's FutureWarning
    (recorded by `warnings`, which tools check); where it did not, neither model warns."""
    ours, stock = pair(seed=41)
    x = _ids(seed=41)
    for pair_of_models in ((ours, stock), (ours.model, stock.model)):
        caught = []
        for model in pair_of_models:
            with torch.no_grad():
                past = model(x[:, :10], use_cache=True).past_key_values
                with warnings.catch_warnings(record=True) as seen:
                    warnings.simplefilter("always")
                    model(x[:, 10:], past_key_values=past)
            caught.append([str(w.message) for w in seen if issubclass(w.category, FutureWarning)
                           and "`past_key_values` is deprecated" in str(w.message)])
        assert bool(caught[0]) == bool(caught[1]), caught


@pytest.mark.parametrize("path", WINDOWS)
def test_eager_attn_implementation_returns_stock_attentions(pair, path):
    ours, stock = pair(seed=40, keep_window_size=WINDOWS[path])
    x = _ids(seed=40)
    mask = _padded(x)
    ours.set_attn_implementation("eager")
    with torch.no_grad():
        a = ours(x, attention_mask=mask, output_attentions=True)
        b = stock(x, attention_mask=mask, output_attentions=True)
    real = mask.bool()
    assert ((a.logits - b.logits)[real]).abs().max() <= 1e-4
    assert len(a.attentions) == len(b.attentions) == ours.config.num_hidden_layers
    for wa, wb in zip(a.attentions, b.attentions):
        assert (wa - wb).transpose(1, 2)[real].abs().max() <= 1e-5  # padded queries' rows: arbitrary in both


def test_parallel_plans_are_stocks():
    assert DogeForCausalLM._tp_plan == transformers.DogeForCausalLM._tp_plan
    assert DogeForCausalLM._pp_plan == transformers.DogeForCausalLM._pp_plan
    config = tiny_config()
    assert "layers.*.self_attn.q_proj" in config.base_model_tp_plan
    model = DogeForCausalLM(config)
    randomize_extras(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: sharded together
