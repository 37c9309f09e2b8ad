"""Behaviour the stock model cannot give us: causal CDMoE routing, DMA gradients, upcycling."""
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import distinct_tokens, tiny_config
from packaging.version import Version

from doge import DogeForCausalLM
from doge.model.cdmoe import load_balancing_loss
from doge.model.upcycle import NEW_PARAMETERS, upcycle, upcycled_config

MOE = dict(is_moe=True, num_experts=64, num_experts_per_tok=8)


def _changes_past(model, x, t):
    """Max change of logits at positions <= t when token t+1 is replaced."""
    y = x.clone()
    y[:, t + 1] = (y[:, t + 1] + 1) % model.config.vocab_size
    with torch.no_grad():
        return (model(x).logits[:, : t + 1] - model(y).logits[:, : t + 1]).abs().max().item()


def test_cdmoe_routing_is_causal(pair):
    ours, stock = pair(seed=11, **MOE)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(11))
    for t in (0, 5, 22):
        assert _changes_past(ours, x, t) == 0.0
    # The same check catches the reference's `.view(2, B*L, K)` scrambling.
    assert max(_changes_past(stock, x, t) for t in (0, 5, 22)) > 1e-3


def _grads(model, x):
    model.zero_grad()
    logits = model(x).logits
    (logits.float().pow(2).mean() + logits[..., 0].sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("window, length", [(2048, 64), (20, 64)], ids=["fast", "sparse"])
def test_dma_bias_gradients_match_materialised_mask(pair, window, length):
    """Gradients of A and dt_proj (and everything else) equal those of the stock eager attention,
    which adds a materialised L x L bias mask."""
    ours, stock = pair(seed=12, keep_window_size=window)
    ours.train(), stock.train()
    x = distinct_tokens(2, length, 256, seed=12)
    g_ours, g_stock = _grads(ours, x), _grads(stock, x)
    assert set(g_ours) == set(g_stock)
    for name in g_ours:
        scale = g_stock[name].abs().max().item() + 1e-6
        assert (g_ours[name] - g_stock[name]).abs().max().item() <= 1e-4 * max(scale, 1.0), name
    assert any(g_ours[n].abs().max() > 0 for n in g_ours if n.endswith(".A"))
    assert any(g_ours[n].abs().max() > 0 for n in g_ours if "dt_proj" in n)


@pytest.mark.skipif(Version(transformers.__version__) < Version("5.23"),
                    reason="stock's aux loss before 5.23 reads each expert's router probability at the wrong index "
                           "(its softmax over candidate pairs is not scattered to the pairs' expert ids)")
def test_load_balancing_loss_matches_stock_formula(pair):
    ours, _ = pair(seed=13, **MOE)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(13))
    mask = torch.ones_like(x)
    mask[1, :5] = 0
    out = ours(x, output_router_logits=True)
    k = ours.model.layers[0].mlp.num_keys
    stock_layout = tuple(r.view(-1, 2, k).permute(1, 0, 2) for r in out.router_logits)
    for m in (None, mask):
        ref = transformers.models.doge.modeling_doge.load_balancing_loss_func(stock_layout, 64, k, 8, m)
        ours_loss = load_balancing_loss(out.router_logits, 64, 8, m)
        assert abs(ours_loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    labelled = ours(x, labels=x, output_router_logits=True)
    plain = ours(x, labels=x, output_router_logits=False)
    coef = ours.config.router_aux_loss_coef
    assert torch.allclose(labelled.loss, plain.loss + coef * labelled.aux_loss)


def test_upcycled_model_starts_equal_and_trains_new_parameters():
    torch.manual_seed(14)
    dense = DogeForCausalLM(tiny_config()).eval()
    moe = upcycle(dense, upcycled_config(dense.config, num_experts=64, top_k=8))
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        assert (moe(x).logits - dense(x).logits).abs().max() <= 1e-5
    moe.train()
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-2)
    new = {n: p for n, p in moe.named_parameters() if any(k in n for k in NEW_PARAMETERS)}
    assert len(new) == 3 * moe.config.num_hidden_layers
    touched = set()
    for _ in range(2):
        moe(x, labels=x).loss.backward()
        touched |= {n for n, p in new.items() if p.grad is not None and p.grad.abs().max() > 0}
        opt.step()
        opt.zero_grad()
    assert touched == set(new)


def test_upcycle_cli_writes_a_stock_loadable_checkpoint(tmp_path):
    torch.manual_seed(15)
    dense = DogeForCausalLM(tiny_config()).eval()
    dense.save_pretrained(tmp_path / "dense")
    cmd = [sys.executable, "-m", "doge.upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"),
           "--num-experts", "64", "--top-k", "4"]
    subprocess.run(cmd, check=True, capture_output=True)
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert stock.config.is_moe and stock.config.num_experts == 64
    x = torch.randint(0, 256, (1, 1))
    with torch.no_grad():
        assert (stock(x).logits - dense(x).logits).abs().max() <= 1e-5
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr


def test_upcycle_rejects_non_square_expert_count():
    with pytest.raises(ValueError, match="perfect square"):
        upcycled_config(tiny_config(), num_experts=60, top_k=4)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_loss_matches_hf_loss_and_gradients(autocast):
    """skip_logits=True (chunked fused LM head + cross-entropy) gives HF's loss and gradients.

    On CPU the fused head computes in float32 even under bf16 autocast (doge/model/loss.py says why),
    so the reference is HF's loss on float32 logits of the same autocast body."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    torch.manual_seed(16)
    model = DogeForCausalLM(tiny_config(vocab_size=3000)).train()
    x = torch.randint(0, 3000, (2, 700), generator=torch.Generator().manual_seed(16))
    labels = x.clone()
    labels[0, :50] = -100

    def reference():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            hidden = model.model(x).last_hidden_state
        logits = torch.nn.functional.linear(hidden.float(), model.lm_head.weight)
        return ForCausalLMLoss(logits, labels, 3000)

    def fused():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x, labels=labels, skip_logits=True)
        assert out.logits is None
        return out.loss

    results = []
    for compute in (reference, fused):
        model.zero_grad()
        loss = compute()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert abs(loss_a - loss_b) <= 1e-5 * abs(loss_a)
    tol = 1e-2 if autocast else 1e-4  # bf16 body: the same gradients, rounded to bf16 (eps 7.8e-3)
    for name in grads_a:
        scale = grads_a[name].abs().max().item()
        assert (grads_a[name] - grads_b[name]).abs().max().item() <= tol * scale + 1e-8, name
