"""doge: DeepSpeed pre-training pipeline for the Doge small language models."""
from doge.configuration import MOE_RECIPES, PRESETS, DogeConfig

__all__ = ["DogeConfig", "PRESETS", "MOE_RECIPES"]
