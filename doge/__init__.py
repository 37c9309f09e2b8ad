"""doge: DeepSpeed pre-training pipeline for the Doge small language models."""
from doge.configuration import MOE_RECIPES, PRESETS, DogeConfig
from doge.modeling import DogeForCausalLM, DogeModel, DogePreTrainedModel

__all__ = ["DogeConfig", "DogeForCausalLM", "DogeModel", "DogePreTrainedModel", "PRESETS", "MOE_RECIPES"]
