"""Recipes and ds_configs: precedence, published numbers, "auto" filling, clear errors."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from doge.training.ds_config import fill
from doge.training.recipe import ChatRecipe, PretrainRecipe, Recipe

REPO = Path(__file__).resolve().parents[1]


def parse(argv, recipe_class=PretrainRecipe):
    parser = argparse.ArgumentParser()
    recipe_class.add_flags(parser)
    return vars(parser.parse_args(argv))


def test_cli_overrides_yaml_overrides_defaults():
    recipe = PretrainRecipe.load(str(REPO / "recipes/doge-20m.yaml"),
                         parse(["--max-steps", "12", "--decay-start", "none", "--export", "false", "--lr", "1e-3"]))
    assert (recipe.max_steps, recipe.lr, recipe.export, recipe.decay_start) == (12, 1e-3, False, None)
    assert recipe.warmup_steps == 800 and recipe.seq_len == 2048  # from the YAML
    assert recipe.max_bad_steps == PretrainRecipe().max_bad_steps  # default


def test_none_on_the_command_line_clears_a_default():
    """SFT runs two epochs unless told otherwise; `--epochs none` makes --max-steps the length."""
    assert ChatRecipe.load(None, parse([], ChatRecipe)).length_in_epochs() == 2.0
    recipe = ChatRecipe.load(None, parse(["--epochs", "none", "--max-steps", "16"], ChatRecipe))
    assert (recipe.epochs, recipe.length_in_epochs(), recipe.max_steps) == (None, None, 16)


@pytest.mark.parametrize("name, lr, warmup, stable, decay, tokens", [
    ("doge-20m", 8e-3, 800, 6400, 800, 0.5e6), ("doge-60m", 6e-3, 1600, 12800, 1600, 1e6),
    ("doge-160m", 4e-3, 2400, 19200, 2400, 1.5e6), ("doge-320m", 2e-3, 3200, 25600, 3200, 2e6)])
def test_published_recipes(name, lr, warmup, stable, decay, tokens):
    recipe = PretrainRecipe.load(str(REPO / f"recipes/{name}.yaml"), {})
    assert (recipe.model, recipe.lr, recipe.warmup_steps, recipe.decay_steps) == (name, lr, warmup, decay)
    assert recipe.max_steps - warmup - decay == stable
    assert abs(recipe.global_batch_tokens - tokens) / tokens < 0.05 and recipe.seq_len == 2048
    assert (recipe.adam_beta1, recipe.adam_beta2, recipe.weight_decay, recipe.grad_clip) == (0.9, 0.95, 0.01, 1.0)
    assert recipe.precision == "bf16"


@pytest.mark.parametrize("name", ["doge-20m", "doge-60m", "doge-160m"])
def test_upcycle_recipes_use_the_published_experts_and_the_dense_batch_and_lr(name):
    from doge.model.configuration import MOE_RECIPES

    dense = PretrainRecipe.load(str(REPO / f"recipes/{name}.yaml"), {})
    moe = PretrainRecipe.load(str(REPO / f"recipes/upcycle-{name}.yaml"), {})
    assert (moe.upcycle_experts, moe.upcycle_top_k) == MOE_RECIPES[name]
    assert (moe.lr, moe.global_batch_tokens, moe.seq_len) == (dense.lr, dense.global_batch_tokens, dense.seq_len)
    assert moe.warmup_steps + moe.decay_steps < moe.max_steps  # a WSD schedule with a stable phase


def entry_point(script: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"doge/{script}.py", *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_pretraining_refuses_a_flag_of_another_objective():
    done = entry_point("train", "--deepspeed", "ds_configs/zero2.json", "--data", "DATADIR", "--output", "RUNDIR",
                       "--beta", "0.1")
    assert done.returncode == 2 and "unrecognized arguments: --beta 0.1" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("script, lr, own, others", [
    ("train", "0.008", ["--upcycle-experts"], ["--epochs", "--beta"]),
    ("sft", "0.0008", ["--epochs"], ["--beta", "--upcycle-experts"]),
    ("dpo", "8e-05", ["--epochs", "--beta"], ["--upcycle-experts"])])
def test_each_entry_point_lists_its_own_fields_and_defaults(script, lr, own, others):
    done = entry_point(script, "--help")
    text = " ".join(done.stdout.split())
    assert done.returncode == 0 and f"--lr V peak learning rate (default {lr})" in text, done.stdout[-3000:]
    assert all(flag in text for flag in own) and not any(flag + " " in text for flag in others), text


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"lr": 1e-3, "learning_rate": 2e-3}))
    with pytest.raises(ValueError, match="learning_rate"):
        PretrainRecipe.load(str(path), {})


def test_help_explains_every_flag():
    parser = argparse.ArgumentParser()
    PretrainRecipe.add_flags(parser)
    text = parser.format_help()
    for field, _ in PretrainRecipe.fields():
        if field.name != "model_overrides":
            assert "--" + field.name.replace("_", "-") in text


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero2_offload"])
def test_ds_configs_fill_every_auto(name):
    recipe = PretrainRecipe.load(str(REPO / "recipes/doge-tiny.yaml"), {})
    config = fill(str(REPO / f"ds_configs/{name}.json"), recipe, micro_batch=8, grad_accum=3, world_size=2, bf16=True)
    assert "auto" not in json.dumps(config)
    assert config["train_batch_size"] == 48 and config["gradient_accumulation_steps"] == 3
    assert config["optimizer"]["params"]["betas"] == [0.9, 0.95] and config["bf16"]["enabled"] is True
    assert config["zero_optimization"]["stage"] == int(name[4])


def test_unknown_auto_is_an_error(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": "auto"}}))
    with pytest.raises(ValueError, match="zero_optimization.stage"):
        fill(str(path), Recipe(), 1, 1, 1, False)
