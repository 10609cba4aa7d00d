"""Separate splits by path (``model.data.data_prefix={train, validation, test}``), several validation datasets
(``val/loss/<name>`` beside the token-weighted ``val/loss``) and the test split (``test/loss`` after training and in
evaluation-only runs), in-process with a tiny GPT over small ``.bin``/``.idx`` files."""
import json
import os

import numpy as np
import pytest
import torch
from helpers import write_dataset

from megatron_ext.config.loader import load_config
from megatron_ext.data.prefixes import parse_split_prefixes
from megatron_ext.errors import ConfigError

_SEQ, _GBS = 16, 4
_TINY = [
    "model.num_layers=1", "model.hidden_size=32", "model.num_attention_heads=2", f"model.seq_length={_SEQ}",
    "model.make_vocab_size_divisible_by=8", "model.micro_batch_size=2", f"model.global_batch_size={_GBS}",
    "trainer.accelerator=cpu", "exp_manager.create_tensorboard_logger=false", "model.hidden_dropout=0.0",
    "model.attention_dropout=0.0", "trainer.log_every_n_steps=1", "model.data.eod_mask_loss=true",
    "exp_manager.checkpoint_callback_params.save_layout_free=false",
]


def _docs(rng, n, length, eod=0):
    """``n`` documents of ``length`` random byte tokens, each ending with ``eod``."""
    return [list(rng.integers(3, 256, size=length)) + [eod] for _ in range(n)]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """train, two validation sets with different loss-token densities (``a``: a short document every 3 tokens, so
    eod_mask_loss drops a third of its tokens; ``b``: long documents) and a test set."""
    from megatron_ext.tokenizers import build_tokenizer

    eod = build_tokenizer("byte").eod
    root = tmp_path_factory.mktemp("splits")
    rng = np.random.default_rng(0)
    out = {name: write_dataset(str(root / "data" / name), _docs(rng, n, length, eod))
           for name, n, length in (("train", 40, 30), ("a", 60, 2), ("b", 4, 60), ("te", 8, 20))}
    out["root"] = root
    return out


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _loss_sums(model, dataset):
    """(sum of the masked per-token losses, loss tokens) of the first global batch of ``dataset``."""
    samples = [dataset[i] for i in range(_GBS)]
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])
    mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).double()
    per_token = model(tokens, position_ids=torch.stack([torch.as_tensor(s["position_ids"]) for s in samples]),
                      labels=labels).double()
    return float((per_token * mask).sum()), float(mask.sum())


@pytest.fixture(scope="module")
def split_run(corpora, tmp_path_factory):
    """One training run (2 steps, validation at step 2) with data_prefix={train: [..], validation: [a, b], test:
    [..]}; then an evaluation-only run of its checkpoint on {validation: [a], test: [..]} (no train entry)."""
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    c = corpora
    exp = tmp_path_factory.mktemp("exp")
    prefix = f"model.data.data_prefix={{train: [{c['train']}], validation: [{c['a']}, {c['b']}], test: [{c['te']}]}}"
    common = [*_TINY, f"exp_manager.exp_dir={exp}", f"model.data.index_mapping_dir={c['root'] / 'cache'}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(load_config(overrides=[
            *common, prefix, "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
            "exp_manager.version=train", "exp_manager.checkpoint_callback_params.every_n_train_steps=0",
            # one named validation set's loss is a metric to keep the best checkpoints by
            "exp_manager.checkpoint_callback_params.monitor=val/loss/a",
            "exp_manager.checkpoint_callback_params.save_top_k=1",
            "exp_manager.checkpoint_callback_params.filename='{val_loss_a:.4f}'"]), GPTTask)
        res = trainer.fit()
        model = trainer.engine.module.eval()
        datasets = trainer.task.build_datasets(trainer._num_samples())
        with torch.no_grad():
            sums = {"a": _loss_sums(model, datasets[1]["a"]), "b": _loss_sums(model, datasets[1]["b"]),
                    "te": _loss_sums(model, datasets[2])}
        ckpt = os.path.join(res["run_dir"], "checkpoints")
        evaluated = Trainer(load_config(overrides=[
            *common, f"model.data.data_prefix={{validation: [{c['a']}], test: [{c['te']}]}}",
            "trainer.limit_train_batches=0", f"model.ckpt_path={ckpt}", "exp_manager.version=eval",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]), GPTTask).fit()
    finally:
        torch.set_num_threads(threads)
    return res, sums, evaluated


def test_validation_sets_are_logged_each_and_token_weighted_and_the_test_split_after_training(split_run):
    res, sums, _ = split_run
    rows = _metrics(res["run_dir"])
    val = [r for r in rows if "val/loss" in r]
    test = [r for r in rows if "test/loss" in r]
    assert [r["step"] for r in val] == [2] and [r["step"] for r in test] == [2]
    assert rows.index(test[0]) > rows.index(val[0])  # after the last validation
    v, t = val[0], test[0]
    (la, na), (lb, nb), (lt, nt) = sums["a"], sums["b"], sums["te"]
    assert na < 0.8 * nb  # eod_mask_loss: a's first batch counts clearly fewer loss tokens than b's
    assert v["val/loss/a"] == pytest.approx(la / na, rel=1e-5)
    assert v["val/loss/b"] == pytest.approx(lb / nb, rel=1e-5)
    assert v["val/loss"] == pytest.approx((la + lb) / (na + nb), rel=1e-5)  # token-weighted over both sets
    assert abs(v["val/loss"] - (la / na + lb / nb) / 2) > 1e-6  # which the mean of the two would not be
    assert v["val/ppl/a"] == pytest.approx(np.exp(la / na), rel=1e-5)
    assert t["test/loss"] == pytest.approx(lt / nt, rel=1e-5) and t["test/ppl"] == pytest.approx(np.exp(lt / nt))
    assert not any(k.startswith("test/loss/") for k in t)  # one test set: no per-set names
    assert res["val_loss"] == v["val/loss"] and res["test_loss"] == t["test/loss"]
    ckpt = os.path.join(res["run_dir"], "checkpoints")
    with open(os.path.join(ckpt, "best.json")) as f:
        best = json.load(f)
    assert best["monitor"] == "val/loss/a" and [e["tag"] for e in best["best"]] == ["step_0000002"]
    assert best["best"][0]["score"] == pytest.approx(v["val/loss/a"])
    assert os.readlink(os.path.join(ckpt, f"val_loss_a={v['val/loss/a']:.4f}")) == "step_0000002"  # Lightning's names


def test_evaluation_only_run_without_train_entry_evaluates_validation_and_test(split_run):
    res, sums, evaluated = split_run
    rows = _metrics(evaluated["run_dir"])
    (la, na), (lt, nt) = sums["a"], sums["te"]
    assert [r["val/loss"] for r in rows if "val/loss" in r] == [pytest.approx(la / na, rel=1e-5)]
    assert [r["test/loss"] for r in rows if "test/loss" in r] == [pytest.approx(lt / nt, rel=1e-5)]
    assert evaluated["test_loss"] == pytest.approx(res["test_loss"], rel=1e-6)


def test_dict_form_parsing_and_its_errors(tmp_path):
    s = parse_split_prefixes({"train": [1, "/d/x", 3, "/d/y"], "validation": {"wiki": "/v/w", "code": ["/v/c"]},
                              "test": [0.5, "/t/a", 0.5, "/t/b"]})
    assert s.train.paths == ("/d/x", "/d/y") and s.train.weights == (1.0, 3.0)
    assert list(s.validation) == ["wiki", "code"] and list(s.test) == ["a"]  # a weighted list is one blended set
    assert s.test["a"].weights == (0.5, 0.5)
    bad = [
        ({"valid": ["/v/a"]}, r"unknown split 'valid' \(did you mean 'validation'\?\)"),
        ({"validation": ["/x/a", "/y/a"]}, "have the same name 'a'"),
        ({"train": {"n": "/x/a"}}, "named datasets"),
        ({"train": ["/x/a", "/x/b"]}, r"data_prefix.train\[0\]='/x/a': expected a positive number"),
        ({}, "names no files"),
    ]
    for value, match in bad:
        with pytest.raises(ConfigError, match=match):
            parse_split_prefixes(value)
    with pytest.raises(ConfigError, match="splits_string='90,5,5' is not used with the dict form"):
        parse_split_prefixes({"train": ["/x/a"]}, splits_string="90,5,5")
    # the run config is checked before any process starts: the same errors from the command line's override
    from megatron_ext.config.loader import check_config

    with pytest.raises(ConfigError, match="unknown split 'val'"):
        check_config(load_config(overrides=["model.data.data_prefix={train: [/x/a], val: [/x/b]}"]))
    with pytest.raises(ConfigError, match="trainer.limit_test_batches=-1"):
        from megatron_ext.config.loader import validate_config

        validate_config(load_config(overrides=["trainer.limit_test_batches=-1"]), 1, False)


def test_missing_train_entry_is_refused_when_training(corpora):
    from megatron_ext.data.gpt_data import build_gpt_datasets
    from megatron_ext.tokenizers import build_tokenizer

    cfg = load_config(overrides=[f"model.data.data_prefix={{validation: [{corpora['a']}]}}"]).model.data
    with pytest.raises(ConfigError, match="has no 'train' entry but 8 training samples are needed"):
        build_gpt_datasets(cfg, build_tokenizer("byte"), _SEQ, (8, 4, 0), 1)


def test_list_form_test_split_is_built_or_dropped_with_a_warning(corpora, caplog):
    """The list form's test split (``splits_string``'s third share) is built when samples are asked for; a share
    that gives it no document (40 documents, "949,50,1") drops it with a warning instead of failing the run."""
    from megatron_ext.data.gpt_data import build_gpt_datasets
    from megatron_ext.tokenizers import build_tokenizer

    tok = build_tokenizer("byte")
    over = [f"model.data.data_prefix=[{corpora['train']}]",
            f"model.data.index_mapping_dir={corpora['root'] / 'cache'}"]
    train, valid, test = build_gpt_datasets(load_config(overrides=[*over, "model.data.splits_string='8,1,1'"])
                                            .model.data, tok, _SEQ, (8, 4, 4), 1)
    assert len(test) >= 4 and len(valid) >= 4  # (megatron-core rounds up to whole epochs)
    with caplog.at_level("WARNING"):
        train, valid, test = build_gpt_datasets(load_config(overrides=over).model.data, tok, _SEQ, (8, 4, 4), 1)
    assert test is None and valid is not None
    assert "leaves the test split of" in caplog.text and "no test split" in caplog.text


def test_bart_dict_form_uses_whole_files_and_names_the_validation_sets(tmp_path):
    from megatron_ext.config.schema import BARTDataConfig
    from megatron_ext.data.bart import build_bart_datasets
    from megatron_ext.tokenizers import build_tokenizer, ensure_mask_token

    tok = ensure_mask_token(build_tokenizer("byte"))
    files = {}
    for name, n in (("tr", 30), ("x", 5), ("y", 7)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("".join(f"{name} line {i} of some words\n" for i in range(n)))
    data = BARTDataConfig(data_prefix={"train": [str(files["tr"])], "validation": [str(files["x"]), str(files["y"])]},
                          data_impl="text_mmap", index_mapping_dir=str(tmp_path / "cache"))
    train, valid, test = build_bart_datasets(data, tok, 32, 32, (16, 8, 8), seed=1)
    assert test is None and list(valid) == ["x", "y"]  # no test entry: no test split
    assert train.doc_range == (0, 30) and valid["x"].doc_range == (0, 5) and valid["y"].doc_range == (0, 7)
    assert len(valid["x"]) == 8 and "x line" in tok.detokenize(valid["x"].target_tokens(0))
    data.splits_string = "90,5,5"
    with pytest.raises(ConfigError, match="is not used with the dict form"):
        build_bart_datasets(data, tok, 32, 32, (16, 8, 8), seed=1)
