"""Dense -> CDMoE upcycling: continue training a dense Doge checkpoint as a CDMoE model.

The dense MLP becomes the shared expert unchanged. The new parameters are the router and the two
expert tables; `up_embed` starts at zero, so the routed term sum_k act(down_k . x) w_k up_k is
exactly zero and the upcycled model computes the dense model's logits at step 0. Its gradient is
act(down_k . x) w_k * dL/dout, non-zero from the first step; once `up_embed` has moved, the router
and `down_embed` get gradients too (by the second optimizer step).

    python -m doge.upcycle DENSE_DIR OUT_DIR --num-experts 1024 --top-k 16

The trainer does the same in one command (`--upcycle-experts`, `--upcycle-top-k`; recipes
`recipes/upcycle-doge-*.yaml`), then trains the CDMoE model with expert parallelism.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from doge import atomic
from doge.model.modeling import DogeForCausalLM
from doge.model.upcycle import upcycle, upcycled_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense_dir", type=Path, help="HF-format dense Doge checkpoint folder")
    parser.add_argument("out_dir", type=Path, help="where to write the CDMoE checkpoint (must not exist)")
    parser.add_argument("--num-experts", type=int, required=True, help="number of experts (a perfect square)")
    parser.add_argument("--top-k", type=int, required=True, help="experts per token (num_experts_per_tok)")
    args = parser.parse_args(argv)
    if args.out_dir.exists():
        parser.error(f"{args.out_dir} exists; choose a new output folder so nothing is overwritten")
    dense = DogeForCausalLM.from_pretrained(args.dense_dir)
    try:
        config = upcycled_config(dense.config, args.num_experts, args.top_k)
    except ValueError as err:
        parser.error(str(err))
    moe = upcycle(dense, config)
    tmp = atomic.fresh_staging_dir(args.out_dir)
    moe.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (args.dense_dir / name).exists():
            shutil.copy2(args.dense_dir / name, tmp / name)
    atomic.publish_dir(tmp, args.out_dir)
    print(f"wrote {args.out_dir}: {args.num_experts} experts, top-{args.top_k}, "
          f"{sum(p.numel() for p in moe.parameters()) / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
