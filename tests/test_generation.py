"""The fast decoder gives exactly the tokens of HF `generate` (ours and stock)."""
import pytest
import torch
from conftest import randomize_extras, stock_twin, tiny_config

from doge import DogeForCausalLM
from doge.model import generation
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


def test_compiled_step_matches_eager_step():
    """compile=True: the single-token steps run as the torch.compile'd static step (it must really
    compile, not fall back) and give the eager step's tokens and, to float32 rounding, its logits."""
    torch.manual_seed(23)
    model = DogeForCausalLM(tiny_config()).eval()
    randomize_extras(model, seed=23)
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(23))
    eager, compiled = Decoder(model, static=False), Decoder(model, static=False, compile=True)
    path = eager.generate(prompt, 20)
    assert torch.equal(compiled.generate(prompt, 20), path)
    assert compiled.compiled.compiled is not None and compiled.compile_seconds > 0
    torch.testing.assert_close(compiled.forced_logits(path, 12), eager.forced_logits(path, 12), atol=1e-4, rtol=1e-4)
    with torch.compiler.set_stance("fail_on_recompile"):  # one graph serves every cache size
        assert torch.equal(compiled.generate(prompt, 37), eager.generate(prompt, 37))
    assert compiled.compiled.compiled is not None and compiled.chunked.compiled is not None  # no eager fallback


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    torch.manual_seed(24)
    model = DogeForCausalLM(tiny_config()).eval()
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(24))
    decoder = Decoder(model, static=False, compile=True)
    with pytest.warns(RuntimeWarning, match="decoding eagerly: RuntimeError: no C\\+\\+ compiler"):
        out = decoder.generate(prompt, 8)
    assert torch.equal(out, Decoder(model, static=False).generate(prompt, 8)) and decoder.compile_seconds == 0


def test_compiled_greedy_chunks_give_the_per_token_tokens(monkeypatch):
    """Compiled greedy decoding runs CHUNK_TOKENS steps per compiled call (3 here: a small graph to
    compile) and gives the eager per-token loop's tokens: with a tail shorter than a chunk, cut at
    EOS inside a chunk (rows ending at different steps), streamed, with a last chunk's positions
    filling the window exactly (5 + 17 + 2 = 24), and stepping per token where they would not fit."""
    monkeypatch.setattr(generation, "CHUNK_TOKENS", 3)
    torch.manual_seed(25)
    model = DogeForCausalLM(tiny_config(keep_window_size=24)).eval()
    randomize_extras(model, seed=25)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(25))
    eager, compiled = Decoder(model, static=False), Decoder(model, static=False, compile=True)
    path = eager.generate(prompt, 17)
    assert torch.equal(compiled.generate(prompt, 17), path)
    assert compiled.chunked.compiled is not None and compiled.chunked.seconds > 0 and compiled.compiled.seconds == 0
    streamed = torch.stack(list(compiled.stream(prompt, 17)), dim=1)
    assert torch.equal(torch.cat([prompt, streamed], dim=1), path)
    for eos in {int(path[0, 10]), int(path[1, 13]), int(path[1, 16]), int(path[0, 19])}:
        expected = eager.generate(prompt, 17, eos_token_id=eos)
        assert torch.equal(compiled.generate(prompt, 17, eos_token_id=eos), expected), eos
    assert torch.equal(compiled.generate(prompt, 19), eager.generate(prompt, 19)) and compiled.compiled.seconds > 0
