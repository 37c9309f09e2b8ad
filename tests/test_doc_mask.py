"""Document-masked packing: a row packed from several documents, with `document_ids`, computes for
each document what that document computes run alone (fp32), on every attention path, forward and
backward; the trainer finds the documents from the EOS tokens of its rows.

The reference is each document run by itself through the same model, with no document ids: an
independent computation (its own shapes, the plain causal paths), at the positions the document
has in the packed row (0, 1, ... with positions restarting per document). Positions continuing
along the row give the same numbers as starting at 0: RoPE makes q.k depend on i - j only and
the DMA bias never sees a position (checked separately).
"""
import pytest
import torch
import train_harness as h
from conftest import randomize_extras, tiny_config
from transformers import AutoTokenizer

from doge import DogeConfig, DogeForCausalLM
from doge.model.dma import dma_attention, document_index, eager_dma_attention, flex_document_attention
from doge.model.rope import document_positions
from doge.training.distributed import Dist
from doge.training.lm_loss import causal_lm_loss
from doge.training.objective import TrainedModel
from doge.training.pretrain import PretrainObjective, document_ids
from doge.training.recipe import PretrainRecipe

# name: (keep_window_size, document lengths). "fast": every visible key kept; "sparse": documents
# longer than the window; "sparse-chunks": a second chunk of queries (past dma.QUERY_CHUNK) with a
# document crossing into it, so the keys carried between chunks must be its own best ones.
ROWS = {"fast": (2048, [13, 29, 22]), "sparse": (8, [13, 29, 22]), "sparse-chunks": (8, [200, 360, 40])}


def packed(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, L) random tokens and their document ids (arbitrary non-decreasing ids: 3, 10, 17)."""
    ids = torch.randint(0, 256, (1, sum(lengths)), generator=torch.Generator().manual_seed(seed))
    documents = torch.cat([torch.full((n,), 3 + 7 * i) for i, n in enumerate(lengths)])[None]
    return ids, documents


def logits_and_grads(model, ids, weights, **inputs):
    """Logits, and the parameter gradients of sum(logits * weights): a loss over every position
    whose gradient over a packed row is the sum of its documents' gradients."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False, **inputs).logits
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def model_for(row: str, attn: str = "sdpa") -> DogeForCausalLM:
    config = tiny_config(keep_window_size=ROWS[row][0])
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = DogeForCausalLM(config)
    randomize_extras(model)  # biases that differ per key: the sparse path's choice of keys matters
    return model


# fp32 gradients are compared relative to each parameter's largest gradient entry. A's gradient
# sums, over every query and key, softmax gradients that nearly cancel; its rounding differs between
# two shapes of the same computation by up to 9e-4 of its largest entry (measured here, the row
# "sparse-chunks" with the SDPA paths), every other parameter's by up to 2.2e-4. A document that saw
# another one would change them by orders of magnitude more (its logits move by > 1e-2).
GRAD_RTOL = 2e-3


@pytest.mark.parametrize("positions", ["continue", "restart"])
@pytest.mark.parametrize("row, attn", [(row, attn) for row in ROWS for attn in ("sdpa", "eager")
                                       if (row, attn) != ("sparse-chunks", "eager")])  # eager has no chunks
def test_each_packed_document_computes_what_it_computes_alone(row, attn, positions):
    model = model_for(row, attn)
    lengths = ROWS[row][1]
    ids, documents = packed(lengths)
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    inputs = {"document_ids": documents}
    if positions == "restart":
        inputs["position_ids"] = document_positions(documents)
    logits, grads = logits_and_grads(model, ids, weights, **inputs)
    alone_grads, start = {}, 0
    for n in lengths:
        part = slice(start, start + n)
        at = {"position_ids": torch.arange(start, start + n)[None]} if positions == "continue" else {}
        alone, doc_grads = logits_and_grads(model, ids[:, part], weights[:, part], **at)
        torch.testing.assert_close(logits[:, part], alone, rtol=0, atol=1e-5)
        alone_grads = {k: alone_grads.get(k, 0) + g for k, g in doc_grads.items()}
        start += n
    for name, grad in grads.items():
        error = (grad - alone_grads[name]).abs().max() / alone_grads[name].abs().max()
        assert error <= GRAD_RTOL, (name, error.item())


@pytest.mark.parametrize("row", ROWS)
def test_in_float64_the_gradients_equal_the_documents_alone_to_rounding(row):
    """The same comparison in float64, where rounding is 1e-9 of fp32's: the gradients of the packed
    row equal the sum of the documents' own to 1e-9 of each parameter's largest entry (A's too), so
    the fp32 bound above is rounding, not a document leaking into another. (The SDPA paths: the
    eager one takes its softmax in float32, as stock's does, whatever the model's dtype.)"""
    model = model_for(row).double()
    lengths = ROWS[row][1]
    ids, documents = packed(lengths)
    weights = torch.randn(*ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(1),
                          dtype=torch.float64)
    logits, grads = logits_and_grads(model, ids, weights, document_ids=documents,
                                     position_ids=document_positions(documents))
    alone_grads, start = {}, 0
    for n in lengths:
        part = slice(start, start + n)
        alone, doc_grads = logits_and_grads(model, ids[:, part], weights[:, part])
        torch.testing.assert_close(logits[:, part], alone, rtol=0, atol=1e-10)
        alone_grads = {k: alone_grads.get(k, 0) + g for k, g in doc_grads.items()}
        start += n
    for name, grad in grads.items():
        error = (grad - alone_grads[name]).abs().max() / alone_grads[name].abs().max()
        assert error <= 1e-9, (name, error.item())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("row", ["fast", "sparse"])
def test_continuing_positions_equal_each_document_alone_from_position_0(row, attn):
    """RoPE is relative and the DMA bias has no position: a document placed further along the row
    computes what it computes from position 0. (fp32 rotation angles, position x frequency, round
    more the further along: at positions near 600 the logits part by 2.7e-5, at these below 64 by
    less than 1e-5.)"""
    model = model_for(row, attn).eval()
    ids, documents = packed(ROWS[row][1])
    start = 0
    with torch.no_grad():
        logits = model(input_ids=ids, document_ids=documents).logits
        for n in ROWS[row][1]:
            alone = model(input_ids=ids[:, start:start + n]).logits
            torch.testing.assert_close(logits[:, start:start + n], alone, rtol=0, atol=1e-5)
            start += n


def test_without_document_ids_the_documents_see_each_other():
    """The check above can fail: the same packed row without ids is another computation."""
    torch.manual_seed(0)
    model = DogeForCausalLM(tiny_config()).eval()
    ids, documents = packed(ROWS["fast"][1])
    with torch.no_grad():
        masked = model(input_ids=ids, document_ids=documents).logits
        plain = model(input_ids=ids).logits
    first = ROWS["fast"][1][0]
    assert torch.equal(masked[:, :first], plain[:, :first])  # the first document sees no other
    assert (masked[:, first:] - plain[:, first:]).abs().max() > 1e-2


@pytest.mark.parametrize("row", ["fast", "sparse-chunks"])
def test_flex_attention_path_equals_the_cpu_path(row):
    """FlexAttention (the CUDA fast path; forward only on CPU) against the CPU fast path and the
    materialised scores, on packed documents with GQA and a bias that varies per key (the longer
    row spans several of FlexAttention's 128-token blocks)."""
    window, lengths = ROWS[row]
    gen = torch.Generator().manual_seed(0)
    length = sum(lengths)
    q, k, v = (torch.randn(2, heads, length, 32, generator=gen) for heads in (6, 3, 3))
    bias = torch.randn(2, 3, length, generator=gen).exp()
    ids = packed(lengths)[1].expand(2, -1)
    kwargs = dict(scaling=32 ** -0.5, keep_window=length, document_ids=ids)
    with torch.no_grad():
        flex = flex_document_attention(q, k, v, bias, 32 ** -0.5, document_index(ids, length, length, None))
        torch.testing.assert_close(flex, dma_attention(q, k, v, bias, **kwargs), rtol=0, atol=1e-5)
        torch.testing.assert_close(flex, eager_dma_attention(q, k, v, bias, **kwargs)[0], rtol=0, atol=1e-5)


def test_document_ids_and_restarting_positions_follow_the_eos_tokens():
    eos = 2
    rows = torch.tensor([[5, 6, 2, 7, 2, 2, 8, 9],
                         [2, 4, 4, 2, 5, 5, 5, 5]])
    documents = document_ids(rows, eos)
    assert documents.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3],
                                  [0, 1, 1, 1, 2, 2, 2, 2]]
    assert document_positions(documents).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1],
                                                      [0, 0, 1, 2, 0, 1, 2, 3]]


def test_document_ids_refuse_a_cache_holding_earlier_tokens():
    torch.manual_seed(0)
    model = DogeForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :6], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="whole row"):
            model(input_ids=ids[:, 6:], past_key_values=cache, document_ids=torch.zeros(1, 2, dtype=torch.long))


def restart_objective() -> PretrainObjective:
    """The pre-training objective over the harness's prepared rows, documents masked apart and
    positions restarting, configured as the trainer runs below is."""
    flags = {"doc_mask": True, "doc_positions": "restart", "seq_len": h.SEQ_LEN, "eval_interval": 0}
    recipe = PretrainRecipe.load(str(h.REPO / "recipes" / "doge-tiny.yaml"), flags)
    return PretrainObjective.open(str(h.prepared()), recipe, DogeConfig.from_preset("doge-tiny"), None)


def test_the_objective_finds_each_rows_documents_at_the_tokenizers_eos():
    """Prepared rows as the trainer reads them, against a plain loop over each row with the EOS id
    of the data's tokenizer folder: the EOS ends its document, positions restart after it."""
    objective = restart_objective()
    eos = AutoTokenizer.from_pretrained(h.prepared() / "tokenizer").eos_token_id
    rows = objective.train.rank_batch(0, h.GLOBAL_SAMPLES, 0, 1)
    inputs = objective.document_inputs(rows)
    for row, documents, positions in zip(rows.tolist(), inputs["document_ids"].tolist(),
                                         inputs["position_ids"].tolist()):
        want_documents, want_positions, document, position = [], [], 0, 0
        for token in row:
            want_documents.append(document)
            want_positions.append(position)
            document, position = (document + 1, 0) if token == eos else (document, position + 1)
        assert documents == want_documents and positions == want_positions
    assert (inputs["document_ids"][:, -1] > 0).sum() >= len(rows) // 2  # most rows hold several documents


def test_the_trainer_trains_on_the_masked_loss(tmp_path):
    """A real 1-rank run from known weights with --doc-mask true --doc-positions restart: its first
    logged loss is that of its first rows with their documents masked apart, computed here with
    those weights, which differs from their loss without the mask."""
    torch.manual_seed(0)
    model = DogeForCausalLM(DogeConfig.from_preset("doge-tiny"))
    model.save_pretrained(tmp_path / "start")
    done = h.run(h.train_cmd(1, tmp_path / "run", h.prepared(), "--model", str(tmp_path / "start"), "--doc-mask",
                             "true", "--doc-positions", "restart", "--max-steps", "1", "--warmup-steps", "0",
                             "--decay-steps", "0", "--save-interval", "0", "--eval-interval", "0",
                             "--export", "false"))
    assert "documents masked apart (positions restart)" in done.stdout + done.stderr
    logged = h.train_lines(tmp_path / "run")[1]["loss"]
    objective, trained = restart_objective(), TrainedModel(model, model.config)
    micro = objective.train_batches(0, h.GLOBAL_SAMPLES, Dist(0, 1, 1), 4)
    with torch.no_grad():
        masked = sum(objective.loss(trained, batch)[0].item() for batch in micro) / len(micro)
        plain = sum(causal_lm_loss(trained, b["input_ids"], b["input_ids"])[0].item() for b in micro) / len(micro)
    assert logged == pytest.approx(masked, abs=1e-5)
    assert abs(masked - plain) > 1e-3, (masked, plain)
