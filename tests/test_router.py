"""CDMoE router options: the z-loss is its formula (on given logits and inside the training loss,
gradient included) and a trainer run logs it; the float32 router computes bf16 models' routing in
float32 (not the bf16 matmul), and stays off by default."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
import train_harness as h
import transformers
from conftest import tiny_config

from doge import DogeForCausalLM
from doge.model.cdmoe import router_z_loss
from doge.training.lm_loss import causal_lm_loss
from doge.training.objective import TrainedModel

MOE = dict(is_moe=True, num_experts=64, num_experts_per_tok=4)


def z_loss_by_hand(layers: list[torch.Tensor], mask: list[float] | None = None) -> float:
    """Mean over layers, unmasked tokens and the two halves of log(sum(exp(half)))^2, in float64."""
    total, count = 0.0, 0.0
    for logits in layers:
        for t, row in enumerate(logits.double().tolist()):
            weight = 1.0 if mask is None else mask[t]
            half = len(row) // 2
            for part in (row[:half], row[half:]):
                total += weight * math.log(sum(math.exp(v) for v in part)) ** 2
                count += weight
    return total / count


def test_z_loss_is_its_formula_on_given_logits():
    gen = torch.Generator().manual_seed(0)
    layers = [torch.randn(6, 16, generator=gen) * 3 for _ in range(3)]  # 6 tokens (B=2, L=3), K = 8
    assert router_z_loss(tuple(layers)).item() == pytest.approx(z_loss_by_hand(layers), rel=1e-6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert router_z_loss(tuple(layers), mask).item() == pytest.approx(
        z_loss_by_hand(layers, mask.reshape(-1).tolist()), rel=1e-6)


def z_loss_weight_run(model, ids, weight: float):
    model.zero_grad()
    model.config.router_z_loss_coef = weight
    loss, metrics = causal_lm_loss(TrainedModel(model, model.config), ids, ids)
    loss.backward()
    return loss.detach(), metrics, [layer.mlp.router_gate.weight.grad.clone() for layer in model.model.layers]


def test_z_loss_enters_the_training_loss_with_its_weight():
    torch.manual_seed(0)
    model = DogeForCausalLM(tiny_config(**MOE))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    want = z_loss_by_hand(list(logits))
    base, _, base_grads = z_loss_weight_run(model, ids, 0.0)
    loss, metrics, grads = z_loss_weight_run(model, ids, 0.25)
    assert metrics["z_loss"].item() == pytest.approx(want, rel=1e-5)
    assert (loss - base).item() == pytest.approx(0.25 * want, rel=1e-4)
    assert metrics["loss"] == pytest.approx(float(base - model.config.router_aux_loss_coef * metrics["aux_loss"]))
    model.zero_grad()
    router_z_loss(model(input_ids=ids, output_router_logits=True).router_logits).backward()
    for with_z, without, z_grad in zip(grads, base_grads, [layer.mlp.router_gate.weight.grad for layer in
                                                             model.model.layers]):
        assert z_grad.abs().max() > 0
        torch.testing.assert_close(with_z - without, 0.25 * z_grad, rtol=1e-4, atol=1e-7)


def bf16_moe(router_fp32: bool) -> DogeForCausalLM:
    """A CDMoE model whose parameters are cast to bf16, as DeepSpeed's bf16 engine casts them."""
    torch.manual_seed(0)
    return DogeForCausalLM(tiny_config(**MOE, router_fp32=router_fp32)).to(torch.bfloat16)


def captured_routing(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer 0's CDMoE input, its router logits) from a whole-model forward."""
    seen = {}
    model.model.layers[0].mlp.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], logits=out[1]))
    with torch.no_grad():
        model(input_ids=ids)
    return seen["x"].reshape(-1, seen["x"].shape[-1]), seen["logits"]


def test_fp32_router_computes_bf16_models_routing_in_float32():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    model = bf16_moe(router_fp32=True)
    gate = model.model.layers[0].mlp.router_gate.weight
    x, logits = captured_routing(model, ids)
    assert x.dtype == torch.bfloat16 and logits.dtype == torch.float32
    exact = F.linear(x.double(), gate.double())
    torch.testing.assert_close(logits.double(), exact, rtol=1e-5, atol=1e-6)
    plain = F.linear(x, gate)  # the bf16 matmul the router would otherwise use
    assert (plain.double() - exact).abs().max() > 100 * (logits.double() - exact).abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not lower it either
        assert model.model.layers[0].mlp.route(x)[0].dtype == torch.float32


def test_router_runs_in_the_model_dtype_by_default():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    model = bf16_moe(router_fp32=False)
    x, logits = captured_routing(model, ids)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, F.linear(x, model.model.layers[0].mlp.router_gate.weight), rtol=0, atol=0)


@pytest.mark.slow
def test_trainer_logs_z_loss_and_aux_loss_and_exports_the_router_keys(tmp_path):
    """One rank, bf16 (DeepSpeed casts the weights), z-loss and the float32 router on: both losses
    logged, the keys saved in the checkpoint and the export, which stock transformers loads."""
    recipe = tmp_path / "moe.yaml"
    recipe.write_text((h.REPO / "recipes" / "doge-tiny.yaml").read_text()
                      + "model_overrides: {is_moe: true, num_experts: 64, num_experts_per_tok: 4}\n")
    rundir = tmp_path / "run"
    h.run(h.train_cmd(1, rundir, h.prepared(), "--recipe", str(recipe), "--max-steps", "2", "--decay-steps", "1",
                      "--warmup-steps", "1", "--eval-interval", "0", "--precision", "bf16",
                      "--router-z-loss-weight", "0.01", "--router-fp32", "true"))
    lines = h.train_lines(rundir)
    assert sorted(lines) == [1, 2]
    for line in lines.values():
        assert line["z_loss"] > 0 and line["aux_loss"] > 0 and math.isfinite(line["loss"])
    state = json.loads((rundir / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["model_config"]["router_z_loss_coef"] == 0.01 and state["model_config"]["router_fp32"] is True
    exported = json.loads((rundir / "final" / "config.json").read_text())
    assert exported["router_fp32"] is True
    stock = transformers.DogeForCausalLM.from_pretrained(rundir / "final")
    assert type(stock) is transformers.DogeForCausalLM and stock.config.is_moe
