"""CDMoE runs train with the load-balancing loss (its weight is the recipe's `aux_loss_weight`) and
log it with router statistics; the auxiliary term really reaches the router's gradient."""
import json

import pytest
import torch
import train_harness as h
from conftest import tiny_config

from doge import DogeForCausalLM
from doge.model.cdmoe import load_balancing_loss
from doge.training.lm_loss import causal_lm_loss
from doge.training.objective import TrainedModel

MOE = dict(is_moe=True, num_experts=64, num_experts_per_tok=4)


def router_grads(model, ids, weight):
    model.zero_grad()
    model.config.router_aux_loss_coef = weight
    loss, metrics = causal_lm_loss(TrainedModel(model, model.config), ids, ids)
    loss.backward()
    return [layer.mlp.router_gate.weight.grad.clone() for layer in model.model.layers], metrics


def test_aux_loss_adds_its_own_gradient_to_the_router():
    torch.manual_seed(0)
    model = DogeForCausalLM(tiny_config(**MOE))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    without, _ = router_grads(model, ids, 0.0)
    with_aux, metrics = router_grads(model, ids, 0.5)
    model.zero_grad()
    out = model(input_ids=ids, output_router_logits=True)
    load_balancing_loss(out.router_logits, 64, 4).backward()
    for a, b, aux in zip(with_aux, without, [layer.mlp.router_gate.weight.grad for layer in model.model.layers]):
        assert aux.abs().max() > 0
        torch.testing.assert_close(a - b, 0.5 * aux, rtol=1e-4, atol=1e-7)
    assert set(metrics) == {"loss", "aux_loss", "z_loss", "experts_used", "max_load"}
    assert 0 < metrics["experts_used"] <= 1 and metrics["max_load"] >= 1


def test_dense_models_report_the_loss_only():
    model = DogeForCausalLM(tiny_config())
    ids = torch.randint(0, 256, (2, 16))
    loss, metrics = causal_lm_loss(TrainedModel(model, model.config), ids, ids)
    assert set(metrics) == {"loss"} and metrics["loss"] == loss.detach()


@pytest.mark.slow
def test_cdmoe_run_logs_aux_loss_and_router_statistics(tmp_path):
    recipe = tmp_path / "moe.yaml"
    recipe.write_text((h.REPO / "recipes" / "doge-tiny.yaml").read_text()
                      + "model_overrides: {is_moe: true, num_experts: 64, num_experts_per_tok: 4}\n")
    rundir = tmp_path / "run"
    h.run(h.train_cmd(2, rundir, h.prepared(), "--recipe", str(recipe), "--max-steps", "4", "--decay-steps", "2",
                      "--warmup-steps", "1", "--aux-loss-weight", "0.01", "--export", "false"))
    lines = h.train_lines(rundir)
    assert sorted(lines) == [1, 2, 3, 4]
    for line in lines.values():
        assert line["aux_loss"] > 0 and 0 < line["experts_used"] <= 1 and line["max_load"] >= 1
    val = [r for r in h.metrics(rundir) if "val_loss" in r]
    assert val and "val_aux_loss" in val[-1]
    state = json.loads((rundir / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["model_config"]["is_moe"] and state["model_config"]["router_aux_loss_coef"] == 0.01


def adam_step_deltas(expert_lr_scale: float) -> dict[str, torch.Tensor]:
    """Each parameter's change in one AdamW step (no weight decay) of a CDMoE model from the same
    gradients, with the LR set the way the loop sets it."""
    from types import SimpleNamespace

    from doge.training.engine import param_groups, set_lr

    torch.manual_seed(0)
    model = DogeForCausalLM(tiny_config(**MOE))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    causal_lm_loss(TrainedModel(model, model.config), ids, ids)[0].backward()
    optimizer = torch.optim.AdamW(param_groups(model, 0.0, expert_lr_scale), lr=1.0)
    set_lr(SimpleNamespace(optimizer=optimizer), 1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


def test_expert_lr_scale_multiplies_the_router_and_table_steps_only():
    plain, scaled = adam_step_deltas(1.0), adam_step_deltas(10.0)
    experts = [n for n in plain if n.split(".")[-2] in ("router_gate", "down_embed", "up_embed")]
    assert len(experts) == 3 * 2  # tiny_config's two layers
    for name in plain:
        factor = 10.0 if name in experts else 1.0
        # deltas are differences of fp32 weights (rounding up to ~2e-7), against steps of 1e-3 and 1e-2
        torch.testing.assert_close(scaled[name], plain[name] * factor, rtol=0, atol=1e-6, msg=name)
    assert all(plain[n].abs().max() > 0 for n in experts)
