"""Install the `doge` package: `pip install -e .[dev]` (install torch first on CPU-only machines)."""
from setuptools import find_packages, setup

setup(
    name="doge",
    version="0.1.0",
    description="DeepSpeed pre-training pipeline for Doge small language models (DMA + CDMoE)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["doge", "doge.*"]),
    package_data={"doge": ["eval_tasks/*.yaml", "eval_tasks/*.py", "eval_tasks/_mmlu_template_yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",  # expert parallelism relies on 0.19's MoE grouping, reduction and norm rules
        "transformers>=5.18,<6",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "wandb>=0.18",
        "pyarrow>=15",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.5",
        "psutil>=5.9",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "trl>=1.16",  # trl: DPO loss test
                "lm-eval>=0.4.13,<0.5"],
        "eval": ["lm-eval>=0.4.13,<0.5"],  # python -m doge.evaluate (tested with 0.4.13)
    },
)
