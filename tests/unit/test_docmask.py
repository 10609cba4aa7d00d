"""Document-masked packing (model.data.reset_attention_mask / reset_position_ids): a packed sequence gives the
loss of its documents run separately (fp64), with learned and rotary positions, on every attention path, through
the data pipeline and the GPT task, and in scoring; the settings that cannot work are refused. TP2: the
model_tp_worker (tests/integration/test_model_tp.py); the pipeline engine: test_parallel_equivalence's variant."""
import pytest
import torch
import torch.nn.functional as F

from helpers import compose_entry_config, text_docs, tiny_cfg, write_dataset
from megatron_ext.config.validation import check_run_config
from megatron_ext.errors import ConfigError, DataError
from megatron_ext.models.gpt import GPTModel
from megatron_ext.modules.doc_attention import DocumentMask, document_position_ids, segment_ids_from_tokens
from megatron_ext.parallel.state import initialize_parallel

VOCAB = 61
EOD = 0


@pytest.fixture(autouse=True, scope="module")
def _tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    yield


def packed_rows(seed=3, lengths=((5, 9, 10), (24,), (1, 1, 3, 19))):
    """Rows of documents (each ends with EOD except a row's last one may be cut) and random labels."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lens in lengths:
        row = []
        for n in lens:
            row += torch.randint(1, VOCAB, (n - 1,), generator=g).tolist() + [EOD]
        rows.append(row)
    tokens = torch.tensor(rows)
    tokens[1, -1] = 7  # a row that ends inside its document
    labels = torch.randint(1, VOCAB, tokens.shape, generator=g)
    return tokens, labels


def fp64_model(pos, impl="auto", seed=1):
    cfg = tiny_cfg(seq_length=24, position_embedding_type=pos, document_attention=impl)
    m = GPTModel(cfg, VOCAB, init_seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def ce64(model, tokens, labels, **kw):
    """Per-token CE in fp64 from the gathered fp64 logits."""
    logits = model.gather_logits(model(tokens, **kw)).double()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none").view(
        labels.shape)


def test_segments_and_positions_match_megatron_core():
    from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

    tokens, _ = packed_rows()
    seg = segment_ids_from_tokens(tokens, EOD)
    assert seg.dtype == torch.int32
    for r in range(tokens.shape[0]):
        mask, _, pos = _get_ltor_masks_and_position_ids(tokens[r], EOD, True, True, False, True)
        allowed = ~mask[0]  # megatron: True = masked
        ours = DocumentMask(seg[r:r + 1]).dense()[0, 0]
        assert torch.equal(ours, allowed)
        assert torch.equal(document_position_ids(seg[r:r + 1])[0], pos)


@pytest.mark.parametrize("pos", ["learned_absolute", "rope"])
def test_packed_loss_equals_documents_run_separately(pos):
    tokens, labels = packed_rows()
    seg = segment_ids_from_tokens(tokens, EOD)
    pid = document_position_ids(seg)
    m = fp64_model(pos)
    alone = torch.empty(labels.shape, dtype=torch.float64)  # every document run by itself (positions 0..)
    with torch.no_grad():
        for r in range(tokens.shape[0]):
            for d in seg[r].unique():
                idx = (seg[r] == d).nonzero().squeeze(1)
                alone[r, idx] = ce64(m, tokens[r:r + 1, idx], labels[r:r + 1, idx])[0]
    grads = {}
    for impl in ("packed", "mask"):
        m.document_attention = impl
        with torch.no_grad():
            packed = ce64(m, tokens, labels, position_ids=pid, segment_ids=seg)
        assert (packed - alone).abs().max() < 1e-9, impl
        # the packed loss == the token-weighted loss of the documents run separately (fp64, 1e-6)
        assert abs(packed.mean().item() - alone.sum().item() / alone.numel()) < 1e-6
        m.zero_grad()
        m(tokens, position_ids=pid, labels=labels, segment_ids=seg).mean().backward()  # the training loss
        grads[impl] = {k: p.grad.clone() for k, p in m.named_parameters()}
    for k in grads["mask"]:
        assert (grads["packed"][k] - grads["mask"][k]).abs().max() < 1e-6, k
    # without the document mask the packed loss is different (so the checks above can fail)
    with torch.no_grad():
        assert (ce64(m, tokens, labels, position_ids=pid) - alone).abs().max() > 1e-3


def test_packed_path_with_attention_dropout_and_bad_inputs():
    tokens, labels = packed_rows()
    seg = segment_ids_from_tokens(tokens, EOD)
    cfg = tiny_cfg(seq_length=24, attention_dropout=0.5, document_attention="packed")
    m = GPTModel(cfg, VOCAB, init_seed=0).train()
    loss = m(tokens, labels=labels, segment_ids=seg).mean()
    loss.backward()
    assert torch.isfinite(loss)
    m.eval()
    with pytest.raises(DataError, match="segment_ids shape"):
        m(tokens, segment_ids=seg[:, :5])
    with pytest.raises(DataError, match="segment_ids"):
        m(tokens, segment_ids=seg.float())
    with pytest.raises(DataError, match="without attention_mask"):
        m(tokens, segment_ids=seg, padding_mask=torch.ones_like(tokens, dtype=torch.bool))
    with pytest.raises(ValueError, match="varlen needs CUDA"):
        GPTModel(tiny_cfg(seq_length=24, document_attention="varlen"), VOCAB, init_seed=0)(tokens, segment_ids=seg)


def _data_overrides(tmp_path, *extra):
    from megatron_ext.tokenizers import build_tokenizer

    tok = build_tokenizer("byte")
    texts = ["ab", "hello there", "a much longer document than the others here", "x", "the end"] * 20
    prefix = write_dataset(str(tmp_path / "d"), text_docs(tok, texts))
    return tok, ["+experiment=cpu_smoke", f"model.data.data_prefix=[{prefix}]", "model.seq_length=32",
                 f"model.data.index_mapping_dir={tmp_path / 'c'}", "model.data.splits_string='1,0,0'",
                 "model.hidden_dropout=0", "model.attention_dropout=0", "model.num_layers=1",
                 "model.data.reset_attention_mask=true", "model.data.reset_position_ids=true", *extra]


def test_task_batches_carry_segment_ids_and_loss_is_per_document(tmp_path):
    """The data pipeline (megatron-core GPTDataset + segment ids) and GPTTask.loss (training and validation)."""
    from megatron_ext.data.samplers import build_pretraining_dataloader
    from megatron_ext.training.gpt_task import GPTTask

    tok, over = _data_overrides(tmp_path, "model.position_embedding_type=rope")
    cfg = compose_entry_config(over)
    check_run_config(cfg)
    task = GPTTask(cfg, torch.device("cpu"))
    train, _, _ = task.build_datasets((8, 0, 0))
    batch = next(iter(build_pretraining_dataloader(train, 0, 4, 0, 1)))
    seg = batch["segment_ids"]
    assert seg.dtype == torch.int32 and seg.shape == (4, 32) and int(seg.max()) >= 2  # several documents per row
    assert torch.equal(seg, segment_ids_from_tokens(batch["tokens"], tok.eod))
    assert torch.equal(batch["position_ids"], document_position_ids(seg))  # reset_position_ids
    model = task.build_model().eval()
    with torch.no_grad():
        loss, ntok, _ = task.loss(model, batch)
        total = 0.0
        for r in range(4):
            for d in seg[r].unique():
                idx = (seg[r] == d).nonzero().squeeze(1)
                ce = model(batch["tokens"][r:r + 1, idx], labels=batch["labels"][r:r + 1, idx])
                total += float((ce * batch["loss_mask"][r:r + 1, idx]).sum())
        assert abs(loss.item() - total / float(ntok)) < 1e-5
        plain = GPTTask.loss(task, model, {k: v for k, v in batch.items() if k != "segment_ids"})[0]
        assert torch.allclose(plain, loss)  # segment ids derived from eod when a collate function drops them
    # the pipeline engine's inputs carry them to every stage
    (inputs, _labels) = task.pipeline_batch(batch)
    assert len(inputs) == 3 and torch.equal(inputs[2], seg)


def test_scoring_a_packed_input_scores_each_document_alone():
    from torch.utils.data import DataLoader

    from megatron_ext.inference.lm import LM
    from megatron_ext.tokenizers import build_tokenizer

    tok = build_tokenizer("byte")
    m = GPTModel(tiny_cfg(seq_length=48, position_embedding_type="learned_absolute"), tok.vocab_size, init_seed=4)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    lm = LM(m.eval(), tok, {"model": {"data": {"reset_attention_mask": True, "reset_position_ids": True}}})
    docs = [tok.tokenize(t) + [tok.eod] for t in ("first doc", "a second one", "3rd")]
    packed = sum(docs, [])
    _, _, _, n, per = lm.perplexities([packed], per_token=True, before_exp=True)
    _, _, _, n_alone, alone = lm.perplexities(docs, per_token=True, before_exp=True)
    assert n == n_alone + len(docs) - 1  # plus the first token of each later document, predicted from an eod
    start = 0
    for i, d in enumerate(docs):
        got = per[0, start:start + len(d) - 1]
        assert (got - alone[i, :len(d) - 1]).abs().max() < 1e-5, i
        start += len(d)
    # without the settings (or with them off) the later documents see the earlier ones
    off = lm.perplexities([packed], per_token=True, before_exp=True, reset_attention_mask=False,
                          reset_position_ids=False)[4]
    assert (off[0, len(docs[0]):len(packed) - 1] - per[0, len(docs[0]):len(packed) - 1]).abs().max() > 1e-3
    # a [b, s] tensor: documents from its eod tokens; a batch's own segment_ids win over the eod tokens
    t = torch.tensor([packed])
    assert (lm.perplexities(t, per_token=True, before_exp=True)[4] - per).abs().max() < 1e-6
    one_doc = {"tokens": t[0, :-1], "labels": t[0, 1:], "segment_ids": torch.zeros(len(packed) - 1, dtype=torch.int32)}
    per_b = lm.perplexities(DataLoader([one_doc], batch_size=1), per_token=True, before_exp=True)[4]
    assert (per_b[0, :len(packed) - 1] - off[0, :len(packed) - 1]).abs().max() < 1e-6
    with pytest.raises(ConfigError, match="reset_attention_mask"):
        lm.perplexities([packed], reset_attention_mask="yes")


@pytest.mark.parametrize("overrides, key", [
    (["model.arch=mega", "model.data.reset_attention_mask=true"], "model.arch=mega"),
    (["model.data.task=copy", "model.tokenizer.library=char", "model.data.reset_attention_mask=true"],
     "model.data.task"),
    (["model.document_attention=mask"], "model.data.reset_attention_mask=true"),
    (["model.document_attention=flex", "model.data.reset_attention_mask=true"], "model.document_attention='flex'"),
    (["trainer.accelerator=cpu", "model.document_attention=varlen", "model.data.reset_attention_mask=true"],
     "needs a CUDA device"),
])
def test_config_refusals(overrides, key):
    from megatron_ext.config.loader import check_config

    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace("[", r"\[")) as ei:
        check_config(compose_entry_config(["+experiment=cpu_smoke", *overrides]))
    assert "\n" not in str(ei.value)


def test_bart_has_no_reset_attention_mask_key():
    from megatron_ext.config.loader import check_config
    from megatron_ext.config.schema import BARTConfig

    cfg = compose_entry_config(["+model.data.reset_attention_mask=true"], "configs/bart", "megatron_bart_config")
    with pytest.raises(ConfigError, match="model.data.reset_attention_mask.*a GPT key"):
        check_config(cfg, BARTConfig)


def test_pipeline_layers_carry_segment_ids():
    """The pipeline stages' layers (one stage holding them all; the PP2 run is test_parallel_equivalence's variant)
    pass the segment ids along and give GPTModel's packed output."""
    from megatron_ext.models.gpt_pipe import build_gpt_pipeline

    cfg = tiny_cfg(seq_length=24, position_embedding_type="rope", share_embeddings_and_output_weights=False)
    tokens, _ = packed_rows()
    seg = segment_ids_from_tokens(tokens, EOD)
    pid = document_position_ids(seg)
    pipe = build_gpt_pipeline(cfg, VOCAB, init_seed=2).double().eval()
    ref = GPTModel(cfg, VOCAB, init_seed=2).double().eval()
    with torch.no_grad():
        got = pipe((tokens, pid, seg))[..., :VOCAB]  # (the vocabulary padding is -inf)
        assert (got - ref(tokens, position_ids=pid, segment_ids=seg)[..., :VOCAB]).abs().max() < 1e-9
        assert (pipe((tokens, pid))[..., :VOCAB] - got).abs().max() > 1e-6
