"""model.tokenizer.library=huggingface: ids equal to AutoTokenizer's (GPT-2 byte-level BPE, Llama-style with
add_bos_token) on tinyshakespeare and odd text, the settings of tokenizer_config.json, preprocessing, bad input,
the cache identity, archives (generation without the original directory) and the Hugging Face export."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest

from helpers import NON_ASCII, shakespeare_lines
from megatron_ext.errors import ConfigError
from megatron_ext.tokenizers import HuggingFaceTokenizer, build_tokenizer

ODD = NON_ASCII + ["", " ", "\n", "\n\n", "  leading", "trailing  ", "tab\there", "e\u0301 combining",
                   "\U0001F600\U0001F600", "a</s>b <s> x", "<|endoftext|> hi<|endoftext|>", "<0x41> <unk>",
                   "x" * 300, "ß ﬁ ＡＢＣ", "\r\n windows"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _auto(d):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
    tok.model_max_length = 1 << 40
    return tok


def _variant(src, dst, post=None, **cfg_changes):
    """A copy of the tokenizer directory ``src`` with keys of tokenizer_config.json changed (None: removed) and,
    with ``post``, tokenizer.json's post-processor replaced by that template (``[(token, id)]`` after it)."""
    shutil.copytree(src, dst)
    p = os.path.join(dst, "tokenizer_config.json")
    with open(p) as f:
        cfg = json.load(f)
    for k, v in cfg_changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    with open(p, "w") as f:
        json.dump(cfg, f)
    if post is not None:
        from tokenizers import Tokenizer, processors

        tok = Tokenizer.from_file(os.path.join(dst, "tokenizer.json"))
        tok.post_processor = processors.TemplateProcessing(single=post[0], special_tokens=post[1])
        tok.save(os.path.join(dst, "tokenizer.json"))
    return str(dst)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_ids_equal_autotokenizer(hf_tokenizer_dirs, kind):
    d = hf_tokenizer_dirs[kind]
    ours, auto = build_tokenizer("huggingface", d), _auto(d)
    texts = shakespeare_lines(4000) + ODD
    want = auto(texts)["input_ids"]
    assert want[-len(ODD):] == [auto(t)["input_ids"] for t in ODD]  # the batch call is the per-text call
    assert [ours.tokenize(t) for t in texts] == want
    assert [ours.tokenize_plain(t) for t in texts] == auto(texts, add_special_tokens=False)["input_ids"]
    assert ours.tokenize_batch(texts) == want
    # the preprocessing path: AutoTokenizer's ids, then eod
    flat, lens = ours.tokenize_batch_flat(texts, append_eod=True)
    expected = [ids + [auto.eos_token_id] for ids in want]
    assert lens.tolist() == [len(e) for e in expected] and flat.tolist() == sum(expected, [])
    # decoding drops special tokens, as AutoTokenizer.decode(skip_special_tokens=True)
    for t in texts[:300] + ODD:
        ids = ours.tokenize(t)
        assert ours.detokenize(ids) == auto.decode(ids, skip_special_tokens=True)
    assert ours.vocab_size == len(auto) and ours.eod == auto.eos_token_id
    if kind == "llama":
        assert ours.bos == 1 and ours.tokenize("hello")[0] == 1 and ours.tokenize_plain("hello")[0] != 1
        assert ours.added_around_text == [1] and ours.pad == ours.eod and ours.unk == 0
        assert ours.tokenize("a</s>b").count(2) == 1  # a special token spelled in text is matched, as in HF
    else:
        assert ours.added_around_text == [] and ours.bos == ours.eod == 0


@pytest.mark.parametrize("post,changes,warns", [
    # the post-processor ends every text with eod: it is not appended twice
    (("<s> $A </s>", [("<s>", 1), ("</s>", 2)]), {"add_eos_token": True}, False),
    # flags that disagree with tokenizer.json's post-processor: it is followed (transformers 5), with a warning
    (None, {"add_eos_token": True}, True),
    (None, {"add_bos_token": False}, True),
    (("$A", []), {"add_bos_token": None}, False),  # nothing added around a text
    (None, {"split_special_tokens": True}, False),  # "</s>" in text is plain text
    (None, {"pad_token": "<unk>", "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True,
                                                "lstrip": False, "rstrip": False, "normalized": False,
                                                "single_word": False}}, False),  # the AddedToken form
])
def test_tokenizer_config_settings_follow_autotokenizer(hf_tokenizer_dirs, tmp_path, post, changes, warns):
    import warnings

    d = _variant(hf_tokenizer_dirs["llama"], tmp_path / "v", post, **changes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = build_tokenizer("huggingface", d)
    flagged = [str(w.message) for w in caught if "post-processor" in str(w.message)]
    assert bool(flagged) == warns and all(next(iter(changes)) in m for m in flagged)
    auto = _auto(d)
    texts = shakespeare_lines(200) + ODD
    want = [auto(t)["input_ids"] for t in texts]
    assert [ours.tokenize(t) for t in texts] == want
    flat, lens = ours.tokenize_batch_flat(texts, append_eod=True)
    ends = auto("")["input_ids"][-1:] == [auto.eos_token_id]
    expected = [ids + ([] if ends else [auto.eos_token_id]) for ids in want]
    assert flat.tolist() == sum(expected, []) and lens.tolist() == [len(e) for e in expected]
    assert ours.pad == (auto.pad_token_id if auto.pad_token_id is not None else ours.eod)
    assert ends == (post is not None and "</s>" in post[0])
    base = build_tokenizer("huggingface", hf_tokenizer_dirs["llama"])
    if post is not None or "split_special_tokens" in changes or "pad_token" in changes:  # other ids: other caches
        assert ours.unique_identifiers != base.unique_identifiers


def test_special_tokens_map_and_a_vocab_token_named_special(hf_tokenizer_dirs, tmp_path):
    """special_tokens_map.json overrides tokenizer_config.json when the config has no added_tokens_decoder (else it is
    not read, as in transformers 5); a named special token that is only a vocabulary entry becomes an added token
    (matched in text), as transformers makes it."""
    ours0 = build_tokenizer("huggingface", hf_tokenizer_dirs["gpt2"])
    piece = next(p for p, i in sorted(ours0.backend.get_vocab().items(), key=lambda kv: -kv[1]) if len(p) > 3)
    texts = [f"x{piece}y", piece, "plain text"] + shakespeare_lines(100)
    for old_style in (False, True):
        d = _variant(hf_tokenizer_dirs["gpt2"], tmp_path / f"g{old_style}",
                     **({"added_tokens_decoder": None} if old_style else {}))
        with open(os.path.join(d, "special_tokens_map.json"), "w") as f:
            json.dump({"pad_token": piece}, f)
        ours, auto = build_tokenizer("huggingface", d), _auto(d)
        assert ours.pad == (ours0.backend.token_to_id(piece) if old_style else ours.eod)
        assert auto.pad_token_id == (ours.pad if old_style else None)
        assert [ours.tokenize(t) for t in texts] == [auto(t)["input_ids"] for t in texts]
        assert sorted(os.path.basename(f) for f in ours.files) == ["special_tokens_map.json", "tokenizer.json",
                                                                     "tokenizer_config.json"]


def test_bad_input_is_refused_naming_it(hf_tokenizer_dirs, tmp_path):
    def err(model, key="model.tokenizer.model"):
        with pytest.raises(ConfigError) as e:
            build_tokenizer("huggingface", model)
        assert key in str(e.value)
        return str(e.value)

    assert "is required" in err(None)
    assert "does not exist" in err(str(tmp_path / "nope"))
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "vocab.json").write_text("{}")
    assert "has no tokenizer.json" in err(str(tmp_path / "slow")) and "vocab.json" in err(str(tmp_path / "slow"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    assert "not valid JSON" in err(str(bad))
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    assert "not a valid tokenizer.json" in err(str(bad))
    (bad / "tokenizer.json").write_text("[1, 2]")
    assert "not a Hugging Face tokenizer.json" in err(str(bad))
    llama = hf_tokenizer_dirs["llama"]
    msg = err(_variant(llama, tmp_path / "unk", eos_token="<nope>"))
    assert "eos_token" in msg and "'<nope>'" in msg and "not in the vocabulary" in msg
    msg = err(_variant(llama, tmp_path / "code", auto_map={"AutoTokenizer": ["x.MyTok", None]}))
    assert "auto_map" in msg and "no code" in msg
    msg = err(_variant(llama, tmp_path / "noeos", eos_token=None))
    assert "no eos_token" in msg
    msg = err(_variant(llama, tmp_path / "flag", add_bos_token="yes"))
    assert "add_bos_token" in msg and "true or false" in msg
    cfg_bad = _variant(llama, tmp_path / "cfgbad")
    with open(os.path.join(cfg_bad, "tokenizer_config.json"), "w") as f:
        f.write("{broken")
    assert "tokenizer_config.json" in err(cfg_bad) and "not valid JSON" in err(cfg_bad)
    # the preprocessing flags are named in its errors
    with pytest.raises(ConfigError, match="--tokenizer-model"):
        build_tokenizer("huggingface", str(tmp_path / "nope"), model_key="--tokenizer-model")


def test_identity_pickle_and_a_tokenizer_json_path(hf_tokenizer_dirs, tmp_path):
    d = hf_tokenizer_dirs["llama"]
    ours = build_tokenizer("huggingface", d)
    copy = shutil.copytree(d, tmp_path / "copy")
    by_file = build_tokenizer("huggingface", str(copy / "tokenizer.json"))  # the file: its config files beside it
    assert by_file.unique_identifiers == ours.unique_identifiers  # the same files elsewhere share the caches
    assert by_file.tokenize("To be") == ours.tokenize("To be")
    other = build_tokenizer("huggingface", hf_tokenizer_dirs["gpt2"])
    assert other.unique_identifiers["tokenizer_sha256"] != ours.unique_identifiers["tokenizer_sha256"]
    back = pickle.loads(pickle.dumps(ours))
    assert back.unique_identifiers == ours.unique_identifiers and back.tokenize("a b") == ours.tokenize("a b")
    assert isinstance(back, HuggingFaceTokenizer) and back.files == ours.files


def test_preprocess_ids_equal_autotokenizer(hf_tokenizer_dirs, tmp_path, capsys):
    """tools/preprocess_data.py --tokenizer-library huggingface: AutoTokenizer's ids then eos per document (none added
    when the post-processor ends texts with it); the raw-text dataset (data_impl=jsonl) reads the same documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_ext.cli import preprocess_data as pp
    from megatron_ext.data.gpt_text import TextDocumentTokens

    eos_post = _variant(hf_tokenizer_dirs["llama"], tmp_path / "eos", ("<s> $A </s>", [("<s>", 1), ("</s>", 2)]))
    lines = shakespeare_lines(800)[500:] + ODD
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    for name, d, workers in (("llama", hf_tokenizer_dirs["llama"], 2), ("eos", eos_post, 1)):
        prefix = tmp_path / name  # workers 2: every worker of the pool builds the tokenizer from the directory
        rc = pp.main(["--input", str(src), "--output-prefix", str(prefix), "--tokenizer-library", "huggingface",
                      "--tokenizer-model", d, "--append-eod", "--workers", str(workers), "--chunk-bytes", "2048",
                      "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        auto = _auto(d)
        want = auto(lines)["input_ids"]
        expected = want if name == "eos" else [ids + [auto.eos_token_id] for ids in want]
        assert all(ids[-1] == auto.eos_token_id and ids[-2] != auto.eos_token_id for ids in expected)
        ds = IndexedDataset(f"{prefix}_text_document")
        assert [ds[i].tolist() for i in range(len(ds))] == expected
        docs = TextDocumentTokens(str(src), "jsonl", build_tokenizer("huggingface", d),
                                  index_mapping_dir=str(tmp_path / f"idx_{name}"))
        assert np.array_equal(docs.sequence_lengths, ds.sequence_lengths)
        assert all(np.array_equal(docs.get(i), ds.get(i)) for i in range(len(ds)))


def test_stop_strings_have_no_bos(hf_tokenizer_dirs):
    from megatron_ext.inference.generation import _stop_sequences

    class _LM:
        tokenizer = build_tokenizer("huggingface", hf_tokenizer_dirs["llama"])

    seqs = _stop_sequences(_LM, ["\n\n", "END"], 10 ** 6)
    assert all(1 not in s for s in seqs) and seqs[1] == tuple(_LM.tokenizer.tokenize_plain("END"))


def test_archive_carries_it_and_export_writes_it_back(hf_tokenizer_dirs, tmp_path):
    """A GPT trained with a Hugging Face tokenizer: the .mext archive carries the files (generation works with the
    original directory gone) and the Hugging Face export writes them back (AutoTokenizer gives our ids, the config
    names its bos / eos)."""
    import tarfile

    import torch

    from helpers import greedy_ids, perturb
    from megatron_ext.checkpoint.archive import read_archive
    from megatron_ext.config.loader import load_config
    from megatron_ext.inference.hf_export import export_to_hf
    from megatron_ext.inference.lm import LM
    from megatron_ext.parallel.state import initialize_parallel
    from megatron_ext.training.gpt_task import GPTTask

    initialize_parallel(1, 1, accelerator="cpu")
    d = shutil.copytree(hf_tokenizer_dirs["llama"], tmp_path / "hf_tok")
    cfg = load_config(overrides=["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                                 "model.seq_length=32", "model.hidden_dropout=0", "model.attention_dropout=0",
                                 "model.position_embedding_type=rope", "model.activation=swiglu",
                                 "model.normalization=rmsnorm",
                                 "model.tokenizer.library=huggingface", f"model.tokenizer.model={d}"])
    task = GPTTask(cfg, torch.device("cpu"))
    model = task.build_model()
    perturb(model, seed=5)
    lm = LM(model.eval(), task.tokenizer, cfg)
    assert lm.model.vocab_size == task.tokenizer.vocab_size == 856
    path = lm.save_to(str(tmp_path / "m.mext"))
    shutil.rmtree(d)  # the archive must not need the original directory
    with tarfile.open(path) as tf:
        names = sorted(tf.getnames())
    assert names == ["config.yaml", "manifest.json", "model_weights.pt", "tokenizer/tokenizer.json",
                     "tokenizer/tokenizer_config.json"]
    back = LM.restore_from(path)
    text = "First Citizen: speak"
    assert back.tokenizer.tokenize(text) == lm.tokenizer.tokenize(text) and back.tokenizer.tokenize(text)[0] == 1
    assert back.tokenizer.unique_identifiers == lm.tokenizer.unique_identifiers
    assert torch.equal(back(text), lm(text))
    # generation from the archive: greedy, the prompt encoded with bos first, the new ids decoded by the tokenizer
    out = back.generate(text, max_new_tokens=6, greedy=True, stop_tokens=[], output="both")
    prompt = back.tokenizer.tokenize(text)
    assert prompt + list(out["tokens"]) == greedy_ids(lm, prompt, 6)
    assert out["text"] == back.tokenizer.detokenize(out["tokens"])
    # scoring from the archive: the text encoded as in training, the same perplexity as the original model
    scored = [text, "To be, or not"]
    a, b = lm.perplexities(scored), back.perplexities(scored)
    assert a[0] == b[0] and np.isfinite(a[0])
    assert b[3] == sum(len(back.tokenizer.tokenize(t)) - 1 for t in scored)  # bos first: every text token predicted
    again = LM.restore_from(back.save_to(str(tmp_path / "again.mext")))  # from the extracted copy
    assert again.tokenizer.unique_identifiers == lm.tokenizer.unique_identifiers

    summary = export_to_hf(read_archive(path), str(tmp_path / "hf"), arch="llama")
    assert summary["tokenizer"] == "huggingface" and not summary["tokenizer_mismatches"]
    auto = _auto(str(tmp_path / "hf"))
    for t in shakespeare_lines(100) + ODD:
        assert auto(t)["input_ids"] == back.tokenizer.tokenize(t)
    with open(tmp_path / "hf" / "config.json") as f:
        hf_cfg = json.load(f)
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["vocab_size"]) == (1, 2, 856)
    assert np.array_equal(np.asarray(lm.tokenizer.tokenize(text)), np.asarray(auto(text)["input_ids"]))
