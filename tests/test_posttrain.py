"""Post-training: chat data (loss mask), the SFT and DPO objectives, and 2-rank runs on real chat data.

SFT starts from the pre-training reference run's export (the harness's tiny model and its 1024-token
ChatML tokenizer); DPO starts from the SFT run's export. Everything runs through the real CLIs.
"""
from __future__ import annotations

import functools
import json
import sys
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import train_harness as h
import yaml
from conftest import ASSETS

OASST, GSM8K = ASSETS / "sft" / "oasst_en_messages.jsonl", ASSETS / "sft" / "gsm8k_train.jsonl"
HH = ASSETS / "dpo" / "hh_helpful_base_test.jsonl.gz"
CHAT_LEN = 256
# 16 steps of 8 conversations (4 per rank, micro batch 2), checkpoints every 8 (--epochs none: the chat
# recipes' default of 2 epochs would set max_steps from the data).
SFT_RUN = ["--deepspeed", "ds_configs/zero2.json", "--seq-len", str(CHAT_LEN), "--micro-batch-size", "2",
           "--global-batch-tokens", str(8 * CHAT_LEN), "--max-steps", "16", "--warmup-steps", "2", "--decay-steps",
           "4", "--lr", "2e-3", "--log-interval", "1", "--eval-interval", "0", "--save-interval", "8",
           "--precision", "fp32", "--wandb", "off", "--keep-last", "0", "--epochs", "none"]


def prepare_chat(name: str, kind: str, *inputs, extra=()) -> h.Path:
    out = h.BASE / name
    if not out.is_dir():
        h.run([sys.executable, "data_tools/prepare_chat.py", "--kind", kind, "--input", *map(str, inputs),
               "--tokenizer", str(h.tokenizer()), "--seq-len", str(CHAT_LEN), "--output", str(out), *extra])
    return out


@functools.lru_cache(maxsize=None)
def sft_data() -> h.Path:
    """30 OpenAssistant conversations plus 60 GSM8K problems (question/answer fields)."""
    h._make_base()
    return prepare_chat("sft", "sft", OASST, GSM8K, extra=("--fields", "question,answer"))


@functools.lru_cache(maxsize=None)
def dpo_data() -> h.Path:
    """40 HH-RLHF helpful pairs (those that fit 256 tokens): few enough that 4 epochs show the training
    pairs' margin rising."""
    h._make_base()
    return prepare_chat("dpo", "dpo", HH, extra=("--val-fraction", "0"))


def sft_cmd(rundir, model) -> list[str]:
    return ["torchrun", "--standalone", "--nproc_per_node", "2", "doge/sft.py", "--model", str(model),
            "--data", str(sft_data()), "--output", str(rundir), *SFT_RUN]


@functools.lru_cache(maxsize=None)
def sft_run() -> h.Path:
    rundir = h.BASE / "sft-run"
    h.run(sft_cmd(rundir, h.reference_run() / "final"))
    return rundir


def tiny_model(seed: int = 0):
    from doge import DogeConfig, DogeForCausalLM

    torch.manual_seed(seed)
    return DogeForCausalLM(DogeConfig.from_preset("doge-tiny", vocab_size=1024)).eval()


def mask_runs(mask) -> list[tuple[int, int]]:
    """[start, stop) of each run of 1s."""
    edges = torch.diff(torch.as_tensor(mask, dtype=torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                       append=torch.zeros(1, dtype=torch.int8))
    return list(zip(torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()))


def test_sft_mask_covers_exactly_the_assistant_turns_and_their_end_token():
    from doge.data.chat import open_chat_data
    from doge.data.tokenizer import load_tokenizer

    data, tok = open_chat_data(sft_data(), "sft"), load_tokenizer(str(h.tokenizer()))
    manifest = json.loads((sft_data() / "manifest.json").read_text())
    assert [s["kept"] for s in manifest["sources"]] == [30, 60]
    conversations = [json.loads(line)["messages"] for line in OASST.read_text().splitlines()]
    checked = 0
    for i in range(len(data)):
        ids, mask = data.rows([i])
        text = tok.decode(ids[0][ids[0] != tok.pad_token_id])
        match = [c for c in conversations if text == tok.apply_chat_template(c, tokenize=False)]
        if not match:  # truncated, a GSM8K problem, or held out
            continue
        answers = [m["content"] + "<|im_end|>" for m in match[0] if m["role"] == "assistant"]
        assert [tok.decode(ids[0][a:b]) for a, b in mask_runs(mask[0])] == answers
        checked += 1
    assert checked >= 5


def test_sft_batch_loss_equals_the_per_conversation_losses():
    from doge.data.chat import open_chat_data
    from doge.training.objective import TrainedModel
    from doge.training.posttrain import SFTObjective, trim

    data, model = open_chat_data(sft_data(), "sft"), tiny_model()
    ids, mask = (torch.from_numpy(a) for a in data.rows([0, 5, 40, 80]))
    batch = trim(ids, mask)
    assert batch["input_ids"].shape[1] < CHAT_LEN or mask[:, -1].any()
    with torch.no_grad():
        loss, metrics = SFTObjective(data, None).loss(TrainedModel(model, model.config), batch)
        total, count = 0.0, 0
        for row, row_mask in zip(ids, mask):  # each conversation alone, no padding, plain cross-entropy
            stop = int(row_mask.nonzero().max()) + 1
            logits = model(input_ids=row[None, :stop]).logits[0, :-1]
            targets = row_mask[1:stop]
            total += F.cross_entropy(logits[targets], row[1:stop][targets], reduction="sum").item()
            count += int(targets.sum())
    assert loss.item() == pytest.approx(total / count, abs=1e-5)
    assert metrics["loss"].item() == pytest.approx(total / count, abs=1e-5)


def test_dpo_loss_equals_trl_dpo_trainer_on_the_same_log_probs():
    """trl's DPOTrainer loss (its own code, sigmoid type) fed the same per-token log-probs."""
    pytest.importorskip("trl")
    from trl import DPOTrainer

    from doge.training.posttrain import dpo_loss

    gen = torch.Generator().manual_seed(0)
    pairs, length, beta = 4, 12, 0.1
    mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    for r in range(2 * pairs):
        mask[r, 3 + r % 3: length - r % 2] = 1
    policy, ref = (-5 * torch.rand(2 * pairs, length - 1, generator=gen) for _ in range(2))

    def per_seq(tokens):
        return (tokens * mask[:, 1:]).sum(1)

    def model(**_):  # trl's batch is [chosen..., rejected...]; its model returns masked per-token log-probs
        lp = policy * mask[:, 1:]
        return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                               is_top1=torch.zeros_like(lp, dtype=torch.bool))

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), args=SimpleNamespace(), _total_train_tokens=0, _tp_size=1,
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, label_smoothing=0.0, use_weighting=False,
        _metrics={"train": defaultdict(list)})
    inputs = {"input_ids": torch.zeros(2 * pairs, length, dtype=torch.long), "completion_mask": mask,
              "attention_mask": torch.ones_like(mask), "ref_chosen_logps": per_seq(ref)[:pairs],
              "ref_rejected_logps": per_seq(ref)[pairs:]}
    theirs = DPOTrainer._compute_loss(trainer, model, inputs, False)
    p, r = per_seq(policy), per_seq(ref)
    ours, metrics = dpo_loss(p[:pairs], p[pairs:], r[:pairs], r[pairs:], beta)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-5)
    margins = trainer._metrics["train"]["rewards/margins"]
    assert metrics["reward_margin"].item() == pytest.approx(margins[0], abs=1e-5)


def test_dpo_sequence_log_probs_count_only_the_response():
    """The DPO rows' mask starts after the shared prompt: chosen and rejected differ only there."""
    from doge.data.chat import open_chat_data

    data = open_chat_data(dpo_data(), "dpo")
    ids, mask = data.rows([0, 1, 2])
    for chosen, rejected, chosen_mask, rejected_mask in zip(ids[0::2], ids[1::2], mask[0::2], mask[1::2]):
        start = int(chosen_mask.argmax())
        assert start == int(rejected_mask.argmax()) > 0
        assert (chosen[:start] == rejected[:start]).all()


@pytest.mark.slow
def test_sft_two_ranks_loss_falls_and_the_export_loads_in_stock_transformers():
    from transformers import AutoModelForCausalLM

    lines = h.train_lines(sft_run())
    assert sorted(lines) == list(range(1, 17))  # --epochs none: --max-steps 16, not the data's two epochs
    first = sum(lines[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(lines[s]["loss"] for s in (14, 15, 16)) / 3
    assert last < first - 0.3, (first, last)
    model = AutoModelForCausalLM.from_pretrained(sft_run() / "final")
    assert model.config.model_type == "doge"


@pytest.mark.slow
def test_sft_kill9_and_resume_gives_bit_identical_weights():
    rundir = h.BASE / "sft-killed"
    job = h.start(sft_cmd(rundir, h.reference_run() / "final"), h.BASE / "sft-killed.log")
    h.wait_for(lambda: h.last_step(rundir) >= 9, 600, "step 9, after the step-8 checkpoint", job)
    h.kill9_group(job)
    assert not (rundir / "final").exists()
    h.run(sft_cmd(rundir, h.reference_run() / "final"))
    h.assert_bit_identical(h.final_weights(sft_run()), h.final_weights(rundir))


@pytest.mark.slow
def test_dpo_two_ranks_reward_margin_on_the_training_pairs_rises():
    rundir = h.BASE / "dpo-run"
    h.run(["torchrun", "--standalone", "--nproc_per_node", "2", "doge/dpo.py", "--model", str(sft_run() / "final"),
           "--data", str(dpo_data()), "--output", str(rundir), *SFT_RUN, "--epochs", "4", "--beta", "0.1",
           "--lr", "1e-3", "--save-interval", "0"])
    pairs = json.loads((dpo_data() / "manifest.json").read_text())["splits"]["train"]["examples"]
    lines = h.train_lines(rundir)
    assert len(lines) == -(-4 * pairs // 8) >= 8  # --epochs 4 sets max_steps from the data's size
    margins = [lines[s]["reward_margin"] for s in sorted(lines)]
    assert sum(margins[-4:]) / 4 > sum(margins[:4]) / 4 + 0.1, margins


def test_decoder_stream_yields_the_tokens_generate_returns():
    from doge.model.generation import Decoder

    model, prompt = tiny_model(), torch.randint(4, 1024, (1, 9), generator=torch.Generator().manual_seed(1))
    decoder = Decoder(model, static=False)
    streamed = torch.stack(list(decoder.stream(prompt, 12, eos_token_id=None)), 1)
    assert torch.equal(torch.cat([prompt, streamed], 1), decoder.generate(prompt, 12))


@pytest.mark.slow
def test_sft_export_chats_through_doge_generate():
    done = h.run([sys.executable, "-m", "doge.generate", "--model", str(sft_run() / "final"), "--prompt",
                  "What is 2 + 3?", "--chat", "--max-new-tokens", "16"])
    assert "tokens/s]" in done.stderr and "What is" not in done.stdout


@pytest.mark.parametrize("name, lr, seq_len, tokens", [
    ("sft-doge-20m", 8e-4, 2048, 0.25e6), ("sft-doge-60m", 6e-4, 2048, 0.25e6),
    ("dpo-doge-20m", 8e-5, 1024, 0.125e6), ("dpo-doge-60m", 6e-5, 1024, 0.125e6)])
def test_post_training_recipes_carry_the_published_values(name, lr, seq_len, tokens):
    recipe = objective_of(name).recipe_class.load(str(h.REPO / "recipes" / f"{name}.yaml"), {})
    assert (recipe.lr, recipe.seq_len, recipe.epochs, recipe.precision) == (lr, seq_len, 2, "bf16")
    assert abs(recipe.global_batch_tokens - tokens) / tokens < 0.05


def objective_of(recipe_name: str):
    from doge.training.posttrain import DPOObjective, SFTObjective

    return {"sft": SFTObjective, "dpo": DPOObjective}[recipe_name.split("-")[0]]


@pytest.mark.parametrize("name", ["sft-doge-20m", "dpo-doge-20m"])
def test_post_training_defaults_are_the_published_20m_recipes(name):
    """Each objective starts from its own defaults: `doge/sft.py` / `doge/dpo.py` without --recipe run
    the published Doge-20M-Instruct recipe (precision stays auto: bf16 on GPUs, fp32 on CPU; seq_len is
    the chat data's, whose rows are padded to the length they were prepared with, and max_steps follows
    from the two epochs)."""
    published = yaml.safe_load((h.REPO / "recipes" / f"{name}.yaml").read_text())
    recipe = objective_of(name).recipe_class()
    defaults = vars(recipe)
    assert {k: defaults[k] for k in published if k not in ("precision", "seq_len")} == {
        k: v for k, v in published.items() if k not in ("precision", "seq_len")}
    assert (recipe.seq_len, recipe.max_steps, recipe.epochs) == (None, None, 2)


def test_a_recipe_key_of_another_objective_is_unknown(tmp_path):
    from doge.training.recipe import ConfigError

    path = tmp_path / "sft-with-beta.yaml"
    path.write_text((h.REPO / "recipes" / "sft-doge-20m.yaml").read_text() + "beta: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown recipe key\(s\) \['beta'\] for SFT; valid keys: .*'epochs'"):
        objective_of("sft").recipe_class.load(str(path), {})


@pytest.mark.slow
def test_dpo_resume_with_another_beta_is_refused_before_the_process_group(tmp_path):
    """What a resume must keep is the objective's to declare (DPO: beta) and preflight's to check:
    a DPO checkpoint trained with beta 0.1, resumed with --beta 0.2, is one error line, exit 2,
    before any data is read or process group started."""
    from dataclasses import asdict

    from test_train_preflight import assert_one_clean_line, lone_rank_of_two

    from doge import DogeConfig
    from doge.training.checkpoint import STATE_FILE, TrainerState

    reference, rundir = tmp_path / "sft-export", tmp_path / "dpo-run"
    reference.mkdir()
    for name in ("config.json", "model.safetensors"):  # an export in name only: the refusal reads neither
        (reference / name).touch()
    recipe = objective_of("dpo").recipe_class(model=str(reference), beta=0.1, seq_len=CHAT_LEN)
    state = TrainerState(step=8, world_size=2, recipe=asdict(recipe),
                         model_config=DogeConfig.from_preset("doge-tiny").to_dict())
    checkpoint = rundir / "checkpoints" / "step-00000008"
    checkpoint.mkdir(parents=True)
    (checkpoint / STATE_FILE).write_text(json.dumps(asdict(state)))
    cmd = [sys.executable, "doge/dpo.py", "--deepspeed", "ds_configs/zero2.json", "--model", str(reference),
           "--data", str(tmp_path / "no-data-needed"), "--output", str(rundir), "--beta", "0.2"]
    done = h.run(cmd, expect_rc=2, timeout=120, **lone_rank_of_two())
    assert_one_clean_line(done, f"--beta (recipe key beta) = 0.2 differs from checkpoint {checkpoint}, trained "
                                "with beta = 0.1: resume with the run's own value (0.1)")


def test_model_must_be_a_preset_or_a_folder():
    from doge.training.recipe import ConfigError, PretrainRecipe

    with pytest.raises(ConfigError, match="neither a preset"):
        PretrainRecipe.load(None, {"model": "doge-7b"})
