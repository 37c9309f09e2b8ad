"""Expert parallelism vs ZeRO-3: memory, step time and traffic per rank of a CDMoE model whose
expert tables hold almost all of its parameters.

    python benchmarks/expert_parallel.py [--cases z2e1 z2e2 z3e1] [--experts 65536] [--hidden 64] [--steps 5]

Each case ("zSeE": ZeRO stage S, expert-parallel size E) trains the model in fresh processes, one per
rank, started by this script (gloo on CPU; nccl when every rank can have a GPU of its own), built
as the trainer builds it: `build_engine` with the repository's ds_configs/zeroS.json, fp32, on
random tokens. ZeRO-3 runs with stage3_param_persistence_threshold 0, so that every parameter is
partitioned (the default keeps tensors under 1e5 numbers whole on every rank: here every dense
matrix). Per case and rank it measures:

- step time: median of --steps optimizer steps after --warmup ones;
- peak RSS (resource.getrusage): over the whole process ("build", which includes the full model
  every rank builds before DeepSpeed partitions or shards it) and over the training steps only
  (the mark is reset after the engine is built); on a GPU also torch's peak allocated memory;
  ZeRO-3's training peak includes the weights it gathers for forward and backward (with
  DeepSpeed's default stage3_max_live_parameters and max_reuse_distance, 1e9 numbers each, a
  model this small stays gathered from its forward to its backward);
- the bytes of the tensors that make up the model state, counted from the engine and its
  optimizer after a backward (gradients still held), each storage once: weights (the model's
  parameters, or their ZeRO-3 partitions), gradients (the parameters' .grad and ZeRO's gradient
  partitions), fp32 master weights + Adam's two moments (the inner optimizer's parameters and
  state). Not counted: activations, ZeRO-1/2's reduce bucket (up to reduce_bucket_size numbers,
  here the whole local gradient) and allocator slack, which the RSS column includes;
- bytes exchanged per step: every collective the rank issues (all_reduce, reduce, broadcast,
  all_gather, all_gather_into_tensor, reduce_scatter, reduce_scatter_tensor, all_to_all,
  all_to_all_single; wrapped in this process only) adds the bytes of the whole buffer it covers
  (the input of a reduce-scatter or all-to-all, the output of an all-gather, the tensor of the
  others); collectives over a group of one rank move nothing and add 0.

Prediction, bytes per rank (fp32, 4 bytes a number; W ranks, E expert-parallel size, D = W/E the
expert-data-parallel size; P_e = the expert tables down_embed + up_embed, P_d = every other
parameter, P = P_d + P_e):

    ZeRO-1/2, E shards   weights      4 (P_d + P_e/E)
                         gradients    4 (P_d/W + P_e/(E D)) = 4 P/W
                         fp32 + m, v  12 (P_d/W + P_e/(E D)) = 12 P/W
    ZeRO-3, E = 1        weights 4 P/W, gradients 4 P/W, fp32 + m, v 8 P/W

(ZeRO-1/2 keep an fp32 master copy of their partition even when the weights are fp32; ZeRO-3 then
steps its fp32 weight partition in place, so only the two moments add to it. DeepSpeed 0.19's ZeRO-1
keeps only its partition of the reduced gradient after the backward, as ZeRO-2 does; the two differ
in how the gradient is reduced on the way, which the RSS column sees. A parameter that straddles
two ranks' partitions has its whole gradient held by both, up to one tensor more than predicted.)

Dense parameters are partitioned over the data-parallel group (W ranks), a shard's rows over its
expert-data-parallel group (D ranks), so with ZeRO-2 only the weights shrink with E: by
4 P_e (1 - 1/E) bytes, the expert share P_e/P times (1 - 1/E) of the weights. ZeRO-3 divides
everything by W, at the price of gathering the weights in every forward and backward.
"""
from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import logging
import os
import re
import resource
import socket
import statistics
import tempfile
import time
import warnings
from functools import wraps
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent
MB = 2 ** 20
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
# Collective -> the argument whose tensor(s) give its payload. Where torch has a newer name the older
# one (all_gather_into_tensor, reduce_scatter_tensor, which DeepSpeed calls) calls it, so only the
# first present is wrapped; both are reported under the older name.
COLLECTIVES = {("all_reduce",): "tensor", ("all_reduce_coalesced",): "tensors", ("reduce",): "tensor",
               ("broadcast",): "tensor", ("all_gather",): "tensor_list",
               ("all_gather_single", "all_gather_into_tensor"): "output_tensor", ("reduce_scatter",): "input_list",
               ("reduce_scatter_single", "reduce_scatter_tensor"): "input", ("all_to_all",): "input_tensor_list",
               ("all_to_all_single",): "input"}
GRADIENT_HOLDERS = ("grads_in_partition", "averaged_gradients",  # ZeRO-1/2
                    "grad_partitions_flat_buffer", "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")
CATEGORIES = {"weights": "weights", "gradients": "gradients", "optimizer": "fp32 master + Adam"}  # key: label


# ---------------------------------------------------------------------------------------------
# Counting, inside a rank


class CommCounter:
    """Payload bytes of the collectives this process issues while `on`, by operation. Installed
    before DeepSpeed starts, because its backend keeps references to the functions it will call."""

    def __init__(self):
        self.on, self.bytes = False, {}
        for names, arg in COLLECTIVES.items():
            name = next(n for n in names if hasattr(c10d, n))
            wrapped = self._wrap(getattr(c10d, name), names[-1], arg)
            setattr(c10d, name, wrapped)
            if hasattr(dist, name):
                setattr(dist, name, wrapped)

    def _wrap(self, fn, label: str, arg: str):
        signature = inspect.signature(fn)

        @wraps(fn)
        def counted(*args, **kwargs):
            if self.on:
                bound = signature.bind(*args, **kwargs).arguments
                if dist.get_world_size(bound.get("group")) > 1:
                    tensors = bound[arg] if isinstance(bound[arg], (list, tuple)) else [bound[arg]]
                    self.bytes[label] = self.bytes.get(label, 0) + sum(t.numel() * t.element_size() for t in tensors)
            return fn(*args, **kwargs)

        return counted


def _tensors(value):
    """The tensors inside an attribute of a ZeRO optimizer (tensor, list, dict, partition group)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif getattr(value, "flat_partition", None) is not None:
        yield value.flat_partition


def _storages(tensors, seen: set) -> int:
    """Bytes of the storages behind `tensors` not in `seen` (views of one flat buffer count once)."""
    total = 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def model_state_bytes(engine) -> dict:
    """Bytes this rank holds per category (see the module docstring); call after a backward."""
    params = list(engine.module.parameters())
    inner = engine.optimizer.optimizer
    masters = [p for g in inner.param_groups for p in g["params"]]
    seen: set = set()
    weights = _storages([p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params], seen)
    optimizer = _storages(masters + [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t)],
                          seen)
    holders = [t for name in GRADIENT_HOLDERS for t in _tensors(getattr(engine.optimizer, name, None))]
    grads = _storages([p.grad for p in params + masters] + holders
                      + [getattr(getattr(p, "ds_tensor", None), "grad", None) for p in params], seen)
    return {"weights": weights, "gradients": grads, "optimizer": optimizer}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Hand the heap freed after the build back to the OS and lower the peak-RSS mark to the
    current RSS (glibc, Linux), so that later peaks measure training, not the build."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# One rank of one case


def ds_config(stage: int, micro: int, world: int) -> dict:
    """The repository's zeroN.json with the trainer's defaults filled in, fp32."""
    from doge.training import ds_config as fill
    from doge.training.recipe import Recipe

    config = fill.fill(str(REPO / "ds_configs" / f"zero{stage}.json"), Recipe(), micro, 1, world, bf16=False)
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return config


def init_rank(rank: int, world: int, port: int, cuda: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", FutureWarning)  # torch 2.13's renamed collectives, once per call site
    if cuda:
        torch.cuda.set_device(rank)
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend=BACKENDS["cuda" if cuda else "cpu"])


def timed_step(engine, model, ids: torch.Tensor, measure: bool = False):
    """One optimizer step of `engine` (`model`: the objective's view of it); its seconds, and the
    model-state bytes after the backward if `measure`."""
    from deepspeed.accelerator import get_accelerator

    from doge.training.lm_loss import causal_lm_loss

    start = time.perf_counter()
    loss, _ = causal_lm_loss(model, ids, ids)
    engine.backward(loss)
    held = model_state_bytes(engine) if measure else None
    engine.step()
    get_accelerator().synchronize()
    return time.perf_counter() - start, held


def run_rank(rank: int, case: dict, settings: dict, port: int, out: str) -> None:
    """Build, warm up, time --steps steps counting collectives, measure once more; rank 0 writes
    every rank's results to `out`."""
    cuda = settings["device"] == "cuda"
    counter = CommCounter()
    init_rank(rank, settings["world"], port, cuda)
    from doge.model.configuration import DogeConfig
    from doge.training.engine import build_engine
    from doge.training.expert_parallel import expert_group
    from doge.training.objective import TrainedModel

    base = peak_rss_mb()
    config = DogeConfig.from_preset(settings["preset"], **settings["overrides"])
    engine = build_engine(config, ds_config(case["stage"], settings["micro"], settings["world"]),
                          weight_decay=0.01, seed=0, expert_parallel_size=case["ep"])
    model = TrainedModel(engine, config, expert_group(case["ep"]))
    build = peak_rss_mb()
    reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(rank)
    shape = (settings["micro"], settings["seq_len"])
    batches = [torch.randint(0, config.vocab_size, shape, generator=gen).to(engine.device) for _ in range(3)]
    times = []
    for step in range(settings["warmup"] + settings["steps"]):
        counter.on = step >= settings["warmup"]
        times.append(timed_step(engine, model, batches[step % 3])[0])
    counter.on = False
    _, held = timed_step(engine, model, batches[0], measure=True)
    mine = dict(step_s=statistics.median(times[settings["warmup"]:]), rss_base_mb=base, rss_build_mb=build,
                rss_train_mb=peak_rss_mb(), held=held,
                comm={k: v / settings["steps"] for k, v in counter.bytes.items()},
                cuda_peak_mb=torch.cuda.max_memory_allocated() / MB if cuda else None)
    every = [None] * settings["world"]
    dist.all_gather_object(every, mine)
    if rank == 0:
        Path(out).write_text(json.dumps(every))
    engine.destroy()
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The parent: cases, predictions, table, summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(case: dict, settings: dict) -> list[dict]:
    """Every rank's results for one case, from fresh processes (so each RSS peak is the case's own)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.spawn(run_rank, args=(case, settings, free_port(), out), nprocs=settings["world"], join=True)
        return json.loads(Path(out).read_text())


def parameter_split(config) -> tuple[int, int]:
    """(P_d, P_e) of the unsharded model, counted on the meta device (no memory)."""
    from doge.model.modeling import DogeForCausalLM

    with torch.device("meta"):
        model = DogeForCausalLM(config)
    expert = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("down_embed.weight", "up_embed.weight")))
    return sum(p.numel() for p in model.parameters()) - expert, expert


def predict(stage: int, ep: int, world: int, dense: int, expert: int) -> dict:
    """Bytes per rank by category, the formulas of the module docstring."""
    if stage == 3:
        share = (dense + expert) / world
        return {"weights": 4 * share, "gradients": 4 * share, "optimizer": 8 * share}
    local = dense + expert / ep
    partition = dense / world + expert / ep / (world // ep)
    return {"weights": 4 * local, "gradients": 4 * partition, "optimizer": 12 * partition}


def summarize(case: dict, ranks: list[dict], predicted: dict) -> dict:
    """The worst rank of each measure (ranks hold near-equal shares), with the prediction."""
    held = {k: max(r["held"][k] for r in ranks) for k in CATEGORIES}
    comm: dict = {}
    for r in ranks:
        for op, b in r["comm"].items():
            comm[op] = max(comm.get(op, 0), b)
    peaks = [r["cuda_peak_mb"] for r in ranks if r["cuda_peak_mb"] is not None]
    return dict(case=case["name"], stage=case["stage"], ep=case["ep"], step_ms=1000 * max(r["step_s"] for r in ranks),
                rss=[max(r[k] for r in ranks) for k in ("rss_base_mb", "rss_build_mb", "rss_train_mb")],
                cuda_peak_mb=max(peaks) if peaks else None, held=held, predicted=predicted,
                comm_mb=sum(comm.values()) / MB, comm_split=comm)


def table(rows: list[dict]) -> str:
    """Markdown: measured / predicted MB per category, RSS, traffic."""
    cuda = rows[0]["cuda_peak_mb"] is not None
    head = ["case", "step ms", "RSS MB base / build / train", *(["GPU peak MB"] if cuda else []),
            *(f"{label} MB meas / pred" for label in (*CATEGORIES.values(), "total")), "MB exchanged per step",
            "by collective"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pairs = [(r["held"][k], r["predicted"][k]) for k in CATEGORIES]
        pairs.append((sum(m for m, _ in pairs), sum(p for _, p in pairs)))
        split = ", ".join(f"{op} {b / MB:.1f}" if b >= MB / 20 else f"{op} <0.1"
                          for op, b in sorted(r["comm_split"].items()))
        cells = [r["case"], f"{r['step_ms']:.0f}", " / ".join(f"{v:.0f}" for v in r["rss"]),
                 *([f"{r['cuda_peak_mb']:.0f}"] if cuda else []),
                 *(f"{m / MB:.1f} / {p / MB:.1f}" for m, p in pairs), f"{r['comm_mb']:.1f}", split or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(label: str, row: dict, ref: dict) -> str:
    """One summary line: `row` against `ref`, each measure as ref -> row."""
    state = [sum(r["held"].values()) / MB for r in (ref, row)]
    return (f"{label}: model state per rank {state[0]:.1f} -> {state[1]:.1f} MB "
            f"({100 * (state[1] / state[0] - 1):+.1f}%), "
            f"weights {100 * (row['held']['weights'] / ref['held']['weights'] - 1):+.1f}%, training peak RSS "
            f"{ref['rss'][2]:.0f} -> {row['rss'][2]:.0f} MB, step {ref['step_ms']:.0f} -> {row['step_ms']:.0f} ms, "
            f"exchanged {ref['comm_mb']:.1f} -> {row['comm_mb']:.1f} MB/step")


def conclusion(rows: dict, dense: int, expert: int) -> list[str]:
    """How far E shards cut memory per rank (against E = 1 at the same stage), and how that
    compares with ZeRO-3 at E = 1."""
    share = expert / (dense + expert)
    lines = [f"parameters: dense P_d {dense / 1e6:.2f}M, expert tables P_e {expert / 1e6:.2f}M "
             f"(expert share {100 * share:.1f}%)"]
    for name, row in rows.items():
        if row["ep"] == 1:
            continue
        ref = rows.get(f"z{row['stage']}e1")
        if ref:
            fall = 100 * share * (1 - 1 / row["ep"])
            lines.append(compare(f"{name} vs {ref['case']}", row, ref)
                         + f" (predicted weights: -expert share x (1 - 1/E) = {-fall:.1f}%)")
        if "z3e1" in rows:
            lines.append(compare(f"z3e1 vs {name}", rows["z3e1"], row))
    return lines


def parse_case(text: str, world: int, experts: int) -> dict:
    match = re.fullmatch(r"z([123])e(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected zSeE, e.g. z2e2 (ZeRO stage S, expert-parallel size E)")
    stage, ep = int(match.group(1)), int(match.group(2))
    if world % ep or experts % ep:
        raise argparse.ArgumentTypeError(f"{text}: E={ep} must divide --world {world} and --experts {experts}")
    if stage == 3 and ep > 1:
        raise argparse.ArgumentTypeError(f"{text}: DeepSpeed refuses expert parallelism under ZeRO-3")
    return dict(name=text, stage=stage, ep=ep)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["z2e1", "z2e2", "z3e1"],
                        help="zSeE = ZeRO stage S (1-3) with expert-parallel size E (E=1 for ZeRO-3); "
                             "default: z2e1 z2e2 z3e1")
    parser.add_argument("--preset", default="doge-tiny", help="preset the CDMoE is built from (default doge-tiny)")
    parser.add_argument("--hidden", type=int, default=64, help="hidden size, 0 = the preset's (default 64)")
    parser.add_argument("--experts", type=int, default=65536,
                        help="experts per CDMoE layer, a square: routing reaches isqrt(N)^2 (default 65536)")
    parser.add_argument("--top-k", type=int, default=16, help="experts per token (default 16)")
    parser.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per step (default 4)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (default 5)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda (nccl) when there is a GPU per rank, else cpu (gloo)")
    args = parser.parse_args(argv)
    try:
        args.cases = [parse_case(c, args.world, args.experts) for c in args.cases]
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.device_count() >= args.world else "cpu"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from doge.model.configuration import DogeConfig

    overrides = dict(is_moe=True, num_experts=args.experts, num_experts_per_tok=args.top_k)
    if args.hidden:
        overrides["hidden_size"] = args.hidden
    config = DogeConfig.from_preset(args.preset, **overrides)
    dense, expert = parameter_split(config)
    os.environ.update(OMP_NUM_THREADS="1", **({} if args.device == "cuda" else {"DS_ACCELERATOR": "cpu"}))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    settings = dict(preset=args.preset, overrides=overrides, world=args.world, micro=args.micro_batch,
                    seq_len=args.seq_len, warmup=args.warmup, steps=args.steps, device=args.device)
    rows = {}
    for case in args.cases:
        start = time.perf_counter()
        ranks = run_case(case, settings)
        rows[case["name"]] = summarize(case, ranks, predict(case["stage"], case["ep"], args.world, dense, expert))
        print(f"{case['name']}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"\n{args.preset} CDMoE, hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"{args.experts} experts top-{args.top_k}; {args.world} ranks ({args.device}, {BACKENDS[args.device]}), "
          f"{args.micro_batch} x {args.seq_len} tokens per rank per step, fp32, torch {torch.__version__}\n")
    print(table(list(rows.values())))
    print("\n" + "\n".join(conclusion(rows, dense, expert)))


if __name__ == "__main__":
    main()
