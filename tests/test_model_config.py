"""Presets follow the published Doge size table; the config is the stock one."""
import pytest
import torch
import transformers

from doge import DogeConfig, DogeForCausalLM

# (hidden, layers, heads, kv heads, intermediate, total parameters with tied embeddings)
TABLE = {
    "doge-20m": (256, 8, 2, 1, 512, 13_118_728),
    "doge-60m": (512, 16, 4, 2, 1024, 54_571_552),
    "doge-160m": (768, 24, 6, 3, 1536, 152_676_168),
    "doge-320m": (1024, 32, 8, 4, 2048, 335_750_272),
}


@pytest.mark.parametrize("name", TABLE)
def test_preset_shapes_and_parameter_counts(name):
    hidden, layers, heads, kv, inter, params = TABLE[name]
    config = DogeConfig.from_preset(name)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size) == (hidden, layers, heads, kv, inter)
    assert config.vocab_size == 32768 and config.tie_word_embeddings and config.max_position_embeddings == 2048
    assert isinstance(config, transformers.DogeConfig) and config.model_type == "doge"
    with torch.device("meta"):
        model = DogeForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == params


def test_moe_preset_uses_the_upcycling_recipe():
    config = DogeConfig.from_preset("doge-20m", is_moe=True)
    assert (config.num_experts, config.num_experts_per_tok) == (1024, 16)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="doge-20m"):
        DogeConfig.from_preset("doge-7b")
