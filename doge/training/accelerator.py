"""The accelerator DeepSpeed found, and the precision a run trains in on it.

Read before anything starts (preflight decides precision and compilation from it) and without a
process group: DeepSpeed's accelerator probe needs neither an engine nor ranks.
"""
from __future__ import annotations


def device_type() -> str:
    """"cuda", "cpu", ...: the accelerator DeepSpeed found."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def use_bf16(precision: str) -> bool:
    """`auto`: bf16 where the accelerator has it natively (GPUs), fp32 on CPU."""
    from deepspeed.accelerator import get_accelerator

    return precision == "bf16" or (precision == "auto" and device_type() != "cpu"
                                   and get_accelerator().is_bf16_supported())
