"""Reduced-precision decode weights (`Decoder(weights=...)`) against fp32 decoding.

Bounds measured on this model (seed 0, 4 prompts, 32 teacher-forced steps, logits up to ~8.7):
fp16 max |logit diff| 0.020 and the same greedy tokens; int8 max |logit diff| 0.43 and 97.7% top-1
agreement (its inputs are quantised to 8 bits per call, and this model's large init and random
norm scales give wide activations). Each bound below is about twice the measured error. The tiny
model's weights are all below the size where the low-bit kernels pay off, so these tests pack
every weight (MIN_PACKED = 0) to check the kernels themselves.
"""
import pytest
import torch
from conftest import randomize_extras, tiny_config

from doge import DogeForCausalLM
from doge.model import lowbit
from doge.model.generation import Decoder

NEW = 32


def setup_case():
    torch.manual_seed(0)
    model = DogeForCausalLM(tiny_config()).eval()
    randomize_extras(model, 0)
    prompt = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(0))
    reference = Decoder(model, static=False)
    path = reference.generate(prompt, NEW)
    return model, prompt, path, reference.forced_logits(path, prompt.shape[1])


@pytest.mark.parametrize("weights, max_diff, min_top1", [("fp16", 0.05, 1.0), ("int8", 1.0, 0.95)])
def test_reduced_weights_agree_with_fp32(weights, max_diff, min_top1, monkeypatch):
    monkeypatch.setattr(lowbit, "MIN_PACKED", 0)
    model, prompt, path, expected = setup_case()
    decoder = Decoder(model, static=False, weights=weights)
    assert {linear.format for w in decoder.layer_weights for linear in w.linears} == {weights}
    logits = decoder.forced_logits(path, prompt.shape[1])
    assert logits.shape == expected.shape == (4, NEW + 1, 256)
    assert (logits - expected).abs().max() <= max_diff
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= min_top1
    if weights == "fp16":
        assert torch.equal(decoder.generate(prompt, NEW), path)
        assert torch.equal(Decoder(model, static=True, weights=weights).generate(prompt, NEW), path)


def test_forced_logits_are_the_greedy_steps():
    """Teacher forcing along the greedy path picks that path again (fp32, exact)."""
    _, prompt, path, logits = setup_case()
    assert torch.equal(logits[:, :-1].argmax(-1), path[:, prompt.shape[1]:])


def test_unknown_weight_format_is_refused():
    with pytest.raises(ValueError, match="choose one of fp32, fp16, int8"):
        Decoder(DogeForCausalLM(tiny_config()), weights="int4")


def test_small_weights_stay_fp32_and_bytes_per_token_counts_the_stored_formats(monkeypatch):
    """Below MIN_PACKED elements a weight stays float32 whatever format is asked for; the bytes a
    step reads follow each weight's stored format (int8: 1 byte per weight + a scale per row)."""
    model = DogeForCausalLM(tiny_config(vocab_size=512))  # the LM head is the largest weight
    all_fp32 = Decoder(model, weights="int8")
    assert all_fp32.lm_head.format == "fp32"
    embed_bytes = model.model.embed_tokens.weight.nbytes  # tied: the LM head, read once per token
    assert all_fp32.bytes_per_token() == sum(p.nbytes for p in model.parameters())
    monkeypatch.setattr(lowbit, "MIN_PACKED", 512 * 96)  # the LM head's size: only it is packed
    head_int8 = Decoder(model, weights="int8")
    assert head_int8.lm_head.format == "int8" and head_int8.layer_weights[0].qkv.format == "fp32"
    assert head_int8.bytes_per_token() == all_fp32.bytes_per_token() - embed_bytes + 512 * 96 + 512 * 4
