"""Post-training objectives on chat DATADIRs (`data_tools/prepare_chat.py`): SFT and DPO.

Both run on the pre-training engine and loop (checkpoints, resume on any world size, signals,
guards, logging); they differ from pre-training only in their data and loss. A sample is one
example: a conversation (SFT) or a chosen/rejected pair (DPO, rows 2i and 2i+1 of a batch). The
example order is a keyed shuffle per epoch, a pure function of the number consumed, as in
pre-training. Rows are right-padded and causal, so each micro-batch is cut to its longest
target: padding costs no compute and changes no loss.

SFT: next-token cross-entropy on the assistant tokens only (the data's loss mask), the mean over
a micro-batch's target tokens. DPO (sigmoid loss, Rafailov et al.): -log sigmoid(beta x ((log
pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))) with sequence log-probs
summed over the response tokens; the reference is the `--model` export, frozen, run beside the
engine on the same device. What defines the DPO objective is recorded in the run (beta, and the
sha256 of the reference's weights in `reference_sha256`), and a resume that changes either is
refused (`doge.training.preflight.check_resume`).

A chat run's row length is its data's (`resolve`): rows are padded to the --seq-len they were
prepared with, so no other length could be trained on.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from doge.data import DataError
from doge.data.chat import TOOL, ChatData, open_chat_data, read_chat_manifest
from doge.data.tokenizer import tokenizer_fingerprint
from doge.model.configuration import PRESETS
from doge.training import checkpoint as ckpt
from doge.training.checkpoint import TrainerState
from doge.training.distributed import Dist
from doge.training.lm_loss import causal_lm_loss
from doge.training.objective import Batch, Objective
from doge.training.recipe import ChatRecipe, ConfigError, DPORecipe


def open_split(data: str, kind: str, split: str, recipe: ChatRecipe, vocab_size: int) -> ChatData:
    try:
        chat = open_chat_data(data, kind, split, recipe.seed)
    except (DataError, OSError) as err:
        raise ConfigError(f"--data {data}: {err}") from err
    if chat.seq_len != recipe.seq_len:
        raise ConfigError(f"--data {data}: rows of {chat.seq_len} tokens but --seq-len {recipe.seq_len}: pass "
                          f"--seq-len {chat.seq_len} (or leave it out: a chat run takes the data's), or prepare the "
                          f"data with {TOOL} --seq-len {recipe.seq_len}")
    if chat.vocab_size > vocab_size:
        raise ConfigError(f"--data {data}: tokenizer has {chat.vocab_size} tokens but the model's vocab_size is "
                          f"{vocab_size}: prepare the data with {TOOL} --tokenizer set to the model's tokenizer")
    return chat


def check_model_tokenizer(data: str, chat: ChatData, recipe: ChatRecipe) -> None:
    """An export carries its tokenizer: the chat data must have been rendered with it."""
    folder = Path(recipe.model)
    if not (folder / "tokenizer.json").is_file():
        return
    found = tokenizer_fingerprint(folder)
    if found != chat.tokenizer_fingerprint:
        raise ConfigError(f"--data {data} uses tokenizer {chat.tokenizer_fingerprint} but --model {folder} was "
                          f"trained with {found}: prepare the data with {TOOL} --tokenizer {folder}")


def trim(ids: np.ndarray, mask: np.ndarray) -> Batch:
    """Cut right padding: keep columns up to the last target token of any row (host arrays, so
    finding the length reads nothing back from the device)."""
    ids, mask = np.asarray(ids), np.asarray(mask)
    targets = np.flatnonzero(mask.any(0))
    length = int(targets[-1]) + 1 if len(targets) else 1
    return {"input_ids": torch.from_numpy(np.ascontiguousarray(ids[:, :length])),
            "loss_mask": torch.from_numpy(np.ascontiguousarray(mask[:, :length]))}


class ChatObjective(Objective):
    recipe_class = ChatRecipe
    kind: str
    variable_length = True

    def __init__(self, train: ChatData, val: ChatData | None):
        self.train, self.val = train, val
        self.fingerprint, self.tokenizer_fingerprint = train.fingerprint, train.tokenizer_fingerprint
        self.tokenizer_dir = train.tokenizer_dir

    @classmethod
    def resolve(cls, data: str, recipe: ChatRecipe, rundir: Path) -> None:
        """seq_len, when not given: a resume's own (read from its checkpoint, so a refused resume
        reads no data), else the chat data's row length."""
        if recipe.seq_len is not None:
            return
        complete, _ = ckpt.scan(Path(rundir) / "checkpoints")
        if complete:
            try:
                recipe.seq_len = ckpt.TrainerState.read(complete[-1]).recipe.get("seq_len")
            except (OSError, ValueError):
                pass  # preflight names the broken checkpoint
            if recipe.seq_len is not None:
                return
        try:
            manifest = read_chat_manifest(Path(data))
            recipe.seq_len = int(manifest["seq_len"])
        except (DataError, OSError, KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"--data {data}: {err}") from err

    @classmethod
    def open(cls, data: str, recipe: ChatRecipe, model_config, source: TrainerState | None):
        if source is None and recipe.model in PRESETS:
            raise ConfigError(f"{cls.kind.upper()} starts from a trained model, not preset {recipe.model}: pass "
                              "--model EXPORT_OR_CHECKPOINT (e.g. the pre-training run's RUNDIR/final)")
        train = open_split(data, cls.kind, "train", recipe, model_config.vocab_size)
        if not len(train):
            held = train.manifest["splits"].get("val", {}).get("examples", 0)
            raise ConfigError(f"--data {data}: no training {cls.kind} example (train split empty, {held} held out): "
                              f"prepare it again with {TOOL} from more records (or a smaller --val-fraction)")
        check_model_tokenizer(data, train, recipe)
        val = open_split(data, cls.kind, "val", recipe, model_config.vocab_size) if recipe.eval_interval else None
        return cls.build(train, val, recipe)

    @classmethod
    def build(cls, train: ChatData, val: ChatData | None, recipe: ChatRecipe):
        return cls(train, val)

    def samples_per_epoch(self) -> int:
        return len(self.train)

    def _batches(self, data: ChatData, examples, micro: int) -> list[Batch]:
        ids, mask = data.rows(examples)
        rows = micro * data.rows_per_example
        return [trim(ids[i:i + rows], mask[i:i + rows]) for i in range(0, len(ids), rows)]

    def train_batches(self, samples_consumed: int, global_batch: int, dist: Dist, micro: int) -> list[Batch]:
        per_rank = global_batch // dist.world
        return self._batches(self.train, self.train.order(samples_consumed + dist.rank * per_rank, per_rank), micro)

    def eval_batches(self, dist: Dist, micro: int, max_samples: int) -> list[Batch]:
        if self.val is None:
            return []
        per_rank = min(max_samples, len(self.val)) // (micro * dist.world) * micro
        return self._batches(self.val, range(dist.rank * per_rank, (dist.rank + 1) * per_rank), micro)

    def describe(self) -> str:
        held_out = f", {len(self.val)} held-out" if self.val is not None else ""
        return f"{self.kind.upper()} on {self.train.describe()}{held_out}"


class SFTObjective(ChatObjective):
    kind = "sft"

    def loss(self, model, batch: Batch):
        labels = batch["input_ids"].masked_fill(~batch["loss_mask"], -100)
        return causal_lm_loss(model, batch["input_ids"], labels)


def sequence_logps(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over each row's target tokens of log p(token | earlier tokens), in fp32."""
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    token = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1)
    return (token * mask[:, 1:]).sum(-1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict]:
    """The sigmoid DPO loss (mean over pairs) and its reward metrics, from sequence log-probs."""
    chosen_reward, rejected_reward = beta * (chosen - ref_chosen), beta * (rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    metrics = {"loss": loss.detach(), "reward_margin": margin.detach().mean(),
               "reward_accuracy": (margin > 0).float().mean(), "chosen_reward": chosen_reward.detach().mean(),
               "rejected_reward": rejected_reward.detach().mean()}
    return loss, metrics


def weights_sha256(folder: Path) -> str | None:
    """sha256 over an export's safetensors files (names and bytes, in name order), None if it has none:
    what identifies DPO's frozen reference. Read once per start (~1 s per GB)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def load_reference(recipe: DPORecipe):
    """The frozen reference policy: the `--model` export DPO starts from."""
    from doge.model.modeling import DogeForCausalLM

    folder = Path(recipe.model)
    if not (folder / "model.safetensors").is_file():
        raise ConfigError(f"--model {recipe.model}: DPO needs an HF export (the SFT model, e.g. RUNDIR/final), "
                          "which is also its frozen reference; export a checkpoint with python -m doge.export")
    reference = DogeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return reference.requires_grad_(False)


class DPOObjective(ChatObjective):
    recipe_class = DPORecipe
    # beta and the reference's weights define the objective: --model, which every resume keeps by name, is
    # also the frozen reference, and its files could be replaced in between
    resume_fields = (*ChatObjective.resume_fields, "beta", "reference_sha256")
    kind = "dpo"

    @classmethod
    def resolve(cls, data: str, recipe: DPORecipe, rundir: Path) -> None:
        super().resolve(data, recipe, rundir)
        folder = Path(recipe.model)
        try:
            recipe.reference_sha256 = weights_sha256(folder) if folder.is_dir() else None
        except OSError as err:
            raise ConfigError(f"--model {folder}: cannot read the reference's weights ({err}); check the "
                              "folder") from err

    def __init__(self, train: ChatData, val: ChatData | None, reference, beta: float):
        super().__init__(train, val)
        self.reference, self.beta = reference, beta

    @classmethod
    def build(cls, train: ChatData, val: ChatData | None, recipe: DPORecipe):
        return cls(train, val, load_reference(recipe), recipe.beta)

    def loss(self, model, batch: Batch):
        ids, mask = batch["input_ids"], batch["loss_mask"]
        self.reference.to(ids.device)
        policy = sequence_logps(model, ids, mask)
        with torch.no_grad():
            reference = sequence_logps(self.reference, ids, mask)
        return dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2], self.beta)
