"""Pre-training: next-token prediction on packed token rows (a prepared DATADIR or a mixture YAML).

The data loader owns `seq_len`: rows prepared longer than the recipe's `seq_len` are cut into
row_len // seq_len samples, so every token is trained on once per epoch, and the sample order
(and thus resume on any world size) stays a pure function of the number of samples consumed.

Rows are packed: documents follow each other, each ended by the tokenizer's EOS token. With the
recipe's `doc_mask` a token attends only to earlier tokens of its own document; the documents are
found from the EOS tokens of each row as it is trained on, so prepared data serves either way.
"""
from __future__ import annotations

import torch

from doge.data import DataError, open_pretrain_data
from doge.model.rope import document_positions
from doge.training.checkpoint import TrainerState
from doge.training.distributed import Dist
from doge.training.lm_loss import causal_lm_loss
from doge.training.objective import Batch, Objective
from doge.training.recipe import ConfigError, PretrainRecipe


def open_data(path: str, recipe: PretrainRecipe, vocab_size: int, split: str):
    try:
        data = open_pretrain_data(path, seed=recipe.seed, split=split, seq_len=recipe.seq_len)
    except (DataError, OSError) as err:
        raise ConfigError(f"--data {path}: {err}") from err
    if data.vocab_size > vocab_size:
        raise ConfigError(f"--data {path}: tokenizer has {data.vocab_size} tokens but the model's vocab_size is "
                          f"{vocab_size}: set model_overrides: {{vocab_size: {data.vocab_size}}} in the recipe or "
                          "prepare the data with a smaller tokenizer")
    return data


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, L) index of each token's document in its packed row: an EOS belongs to the document it
    ends, the token after it starts the next one (a row cut from a longer one may start inside a
    document: that part is document 0)."""
    ends = (input_ids == eos_id).long()
    return ends.cumsum(-1) - ends


class PretrainObjective(Objective):
    recipe_class = PretrainRecipe
    resume_fields = (*Objective.resume_fields, "doc_mask", "doc_positions")

    def __init__(self, train, val, doc_mask: bool = False, doc_positions: str = "continue"):
        self.train, self.val = train, val
        self.fingerprint, self.tokenizer_fingerprint = train.fingerprint, train.tokenizer_fingerprint
        self.tokenizer_dir = train.tokenizer_dir
        self.doc_mask, self.doc_positions = doc_mask, doc_positions

    @classmethod
    def open(cls, data: str, recipe: PretrainRecipe, model_config, source: TrainerState | None
             ) -> "PretrainObjective":
        train = open_data(data, recipe, model_config.vocab_size, "train")
        val = open_data(data, recipe, model_config.vocab_size, "val") if recipe.eval_interval else None
        return cls(train, val, recipe.doc_mask, recipe.doc_positions)

    def train_batches(self, samples_consumed: int, global_batch: int, dist: Dist, micro: int) -> list[Batch]:
        rows = self.train.rank_batch(samples_consumed, global_batch, dist.rank, dist.world)
        return [{"input_ids": part} for part in rows.split(micro)]

    def eval_batches(self, dist: Dist, micro: int, max_samples: int) -> list[Batch]:
        if self.val is None:
            return []
        per_rank = min(max_samples, len(self.val)) // (micro * dist.world) * micro
        first = dist.rank * per_rank
        rows = [torch.as_tensor(self.val[i]) for i in range(first, first + per_rank)]
        return [{"input_ids": torch.stack(rows[i:i + micro])} for i in range(0, per_rank, micro)]

    def loss(self, model, batch: Batch):
        ids = batch["input_ids"]
        return causal_lm_loss(model, ids, ids, **self.document_inputs(ids))

    def document_inputs(self, input_ids: torch.Tensor) -> dict:
        """The model inputs that keep the packed documents apart (none without doc_mask)."""
        if not self.doc_mask:
            return {}
        documents = document_ids(input_ids, self.train.eos_id)
        if self.doc_positions == "restart":
            return {"document_ids": documents, "position_ids": document_positions(documents)}
        return {"document_ids": documents}

    def describe(self) -> str:
        held_out = f", {len(self.val)} held-out samples" if self.val is not None else ""
        documents = f", documents masked apart (positions {self.doc_positions})" if self.doc_mask else ""
        return f"pre-training on {self.train.describe()}{held_out}{documents}"

