"""doge: DeepSpeed pre-training pipeline for the Doge small language models.

The model classes are imported on first use, so `doge.data` and the data CLIs start without
loading torch's model stack and `transformers`' modeling code.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "DogeConfig": "doge.model.configuration",
    "PRESETS": "doge.model.configuration",
    "MOE_RECIPES": "doge.model.configuration",
    "DogeForCausalLM": "doge.model.modeling",
    "DogeModel": "doge.model.modeling",
    "DogePreTrainedModel": "doge.model.modeling",
    "DogeForSequenceClassification": "doge.model.modeling",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'doge' has no attribute {name!r}")
