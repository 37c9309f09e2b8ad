"""Fill the "auto" values of a `ds_configs/*.json` from the recipe and the world size.

One JSON per ZeRO stage serves every model size because batch sizes, LR, betas and clipping come
from the recipe. Any "auto" this module does not know is an error, so nothing silently falls back
to a DeepSpeed default.
"""
from __future__ import annotations

import json

from doge.training.recipe import Recipe


def fill(path: str, recipe: Recipe, micro_batch: int, grad_accum: int, world_size: int, bf16: bool) -> dict:
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    values = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": recipe.grad_clip,
        "optimizer.params.lr": recipe.lr,
        "optimizer.params.betas": [recipe.adam_beta1, recipe.adam_beta2],
        "optimizer.params.eps": recipe.adam_eps,
        "optimizer.params.weight_decay": recipe.weight_decay,
        "bf16.enabled": bf16,
    }

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            name = prefix + key
            if isinstance(value, dict):
                walk(value, name + ".")
            elif value == "auto":
                if name not in values:
                    raise ValueError(f"{path}: '{name}' is \"auto\" but the trainer does not fill it; "
                                     f"set a value. Fillable keys: {', '.join(values)}")
                node[key] = values[name]

    walk(config, "")
    return config
