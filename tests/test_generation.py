"""The fast decoder gives exactly the tokens of HF `generate` (ours and stock)."""
import pytest
import torch
from conftest import randomize_extras, stock_twin, tiny_config

from doge import DogeForCausalLM
from doge.model.generation import Decoder

CASES = {
    "dense": {},
    "sparse-window": dict(keep_window_size=20),  # the context passes the window mid-generation
    "cdmoe": dict(is_moe=True, num_experts=64, num_experts_per_tok=8),
}


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("case", CASES)
def test_decoder_matches_generate(case, static):
    """static=True: the fixed-shape step CUDA graphs capture (the sparse case falls back to eager)."""
    torch.manual_seed(21)
    model = DogeForCausalLM(tiny_config(**CASES[case])).eval()
    randomize_extras(model, seed=21)
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(21))
    kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(prompt, **kwargs)
        if case == "dense":
            assert torch.equal(stock_twin(model).generate(prompt, **kwargs), expected)
    assert torch.equal(Decoder(model, static=static).generate(prompt, 32), expected)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
def test_decoder_stops_at_eos_like_generate(static):
    """Two rows ending at different steps: EOS fills a row once it ended, the output ends where
    every row has (or at max_new_tokens), exactly as HF generate does it."""
    torch.manual_seed(22)
    model = DogeForCausalLM(tiny_config()).eval()
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(22))
    greedy = Decoder(model).generate(prompt, 40)
    for eos in {int(greedy[0, 7]), int(greedy[1, 30]), int(greedy[0, 44])}:
        with torch.no_grad():
            expected = model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        assert torch.equal(Decoder(model, static=static).generate(prompt, 40, eos_token_id=eos), expected), eos


def test_decoder_samples_reproducibly():
    torch.manual_seed(22)
    model = DogeForCausalLM(tiny_config()).eval()
    prompt = torch.randint(0, 256, (1, 5))
    draw = [Decoder(model).generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(3))
            for _ in range(2)]
    assert torch.equal(draw[0], draw[1])
