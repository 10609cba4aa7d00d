""".mext archives: save_to / restore_from for every model family, tokenizer carried, malicious archives refused,
export from real runs (ZeRO-3 DP2 and TP2 checkpoints) reproducing the logged val/loss and the same greedy output,
live save_to gathered from TP2 shards, restore at TP2."""
import io
import json
import os
import tarfile

import pytest
import torch

from helpers import greedy_ids, perturb
from megatron_ext.config.loader import load_config
from megatron_ext.config.schema import BARTConfig
from megatron_ext.errors import CheckpointError
from megatron_ext.inference.lm import LM
from megatron_ext.parallel.state import initialize_parallel
from megatron_ext.checkpoint import archive as A
from megatron_ext.checkpoint.loader import restore_model


GPT_TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=16",
            "model.hidden_dropout=0", "model.attention_dropout=0"]


@pytest.fixture(autouse=True, scope="module")
def _tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    yield


def _lm(family, overrides=(), tokenizer_model=None):
    if family == "encdec":
        from megatron_ext.training.bart_task import BARTTask as Task

        over = ["model.seq_length=12", "model.seq_length_dec=10"] + [
            f"model.{s}.{k}" for s in ("encoder", "decoder")
            for k in ("num_layers=1", "hidden_size=32", "hidden_dropout=0", "attention_dropout=0")]
        cfg = load_config(BARTConfig, overrides=over + list(overrides))
    else:
        from megatron_ext.training.gpt_task import GPTTask as Task

        cfg = load_config(overrides=GPT_TINY + list(overrides))
    if tokenizer_model:
        cfg.model.tokenizer.library = "sentencepiece"
        cfg.model.tokenizer.model = tokenizer_model
    task = Task(cfg, torch.device("cpu"))
    model = task.build_model()
    perturb(model, seed=5)
    return LM(model.eval(), task.tokenizer, cfg)


MEGA = ["model.arch=mega", "model.mega.shared_representation_size=16", "model.mega.intermediate_size=32",
        "model.mega.nffn_hidden_size=32", "model.mega.ema_projection_size=4", "model.mega.normalization_type=batchnorm"]


@pytest.mark.parametrize("family,over", [
    ("gpt", []),
    ("gpt", ["model.position_embedding_type=rope", "model.normalization=rmsnorm", "model.activation=swiglu",
             "model.share_embeddings_and_output_weights=false", "model.bias=false",
             "model.num_attention_heads=8", "model.num_query_groups=2"]),  # Llama-like, grouped-query attention
    ("mega", MEGA),
    ("encdec", []),
])
def test_round_trip_every_family(tmp_path, family, over):
    lm = _lm("gpt" if family == "mega" else family, over)
    assert lm.family == family
    path = lm.save_to(str(tmp_path / "m.mext"))
    back = LM.restore_from(path)
    assert back.family == family and back.info["family"] == family
    sd, sd2 = lm.model.state_dict(), back.model.state_dict()
    assert set(sd) == set(sd2)
    vocab = lm.model.vocab_size
    for k in sd:
        if k.endswith("_extra_state"):
            continue
        a, b = sd[k].float(), sd2[k].float()
        if k.endswith(A.VOCAB_SUFFIXES):  # padding rows are never used (masked logits) and are stored as zeros
            assert not b[vocab:].any(), k
            a, b = a[:vocab], b[:vocab]
        assert torch.equal(a, b), k
    g = torch.Generator().manual_seed(0)
    if family == "encdec":
        enc = torch.randint(0, 200, (2, 12), generator=g)
        dec = torch.randint(0, 200, (2, 10), generator=g)
        mask = torch.ones(2, 12, dtype=torch.bool)
        with torch.no_grad():
            assert torch.equal(lm.model(enc, dec, mask), back.model(enc, dec, mask))
    else:
        x = torch.randint(0, 200, (2, 16), generator=g)
        out = lm(x)
        assert torch.equal(out, back(x))
        assert len(set(greedy_ids(lm, [5, 6, 7], 8)[3:])) > 1  # a meaningful comparison: not one repeated token
        assert greedy_ids(lm, [5, 6, 7], 8) == greedy_ids(back, [5, 6, 7], 8)
    # an archive written from a restored model is the same archive content
    again = back.save_to(str(tmp_path / "again.mext"))
    assert A.read_archive(again)["state_dict"].keys() == A.read_archive(path)["state_dict"].keys()


def test_manifest_and_sentencepiece_tokenizer_carried(tmp_path):
    from megatron_ext.tokenizers import train_sentencepiece

    import random

    rng = random.Random(0)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "do"]
    sents = [" ".join("".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(10))
             for _ in range(600)] + ["gamma delta beta alpha"] * 20
    train_sentencepiece(str(tmp_path / "sp"), 60, sentences=sents)
    lm = _lm("gpt", tokenizer_model=str(tmp_path / "sp.model"))
    path = lm.save_to(str(tmp_path / "sp.mext"))
    os.rename(tmp_path / "sp.model", tmp_path / "moved.model")  # the archive must not need the original file
    with tarfile.open(path) as tf:
        names = sorted(tf.getnames())
        manifest = json.load(tf.extractfile("manifest.json"))
    assert names == ["config.yaml", "manifest.json", "model_weights.pt", "tokenizer/sp.model"]
    assert manifest["format"] == A.FORMAT and manifest["vocab_size"] == 60
    assert set(manifest["files"]) == {"config.yaml", "model_weights.pt", "tokenizer/sp.model"}
    assert {"torch", "megatron-core", "python"} <= set(manifest["versions"])
    back = LM.restore_from(path)
    text = "kalo mine sa"
    assert back.tokenizer.tokenize(text) == lm.tokenizer.tokenize(text)
    assert torch.equal(back(text), lm(text))
    # a restored model's archive still carries the tokenizer (from the extracted copy)
    again = LM.restore_from(back.save_to(str(tmp_path / "again.mext")))
    assert again.tokenizer.tokenize(text) == lm.tokenizer.tokenize(text)


# ------------------------------------------------------------------------------------------- malicious archives
def _tar(path, entries):
    """entries: (TarInfo-like dict, bytes or None)"""
    with tarfile.open(path, "w") as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return str(path)


def _file(name, data):
    i = tarfile.TarInfo(name)
    i.size = len(data)
    return i, data


@pytest.fixture(scope="module")
def good_archive(tmp_path_factory):
    lm = _lm("gpt")
    return lm.save_to(str(tmp_path_factory.mktemp("good") / "good.mext"))


def _members(path):
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.environ.get("MEXT_PWN", "/tmp/mext_pwned"),))


def test_malicious_archives_refused(tmp_path, good_archive, monkeypatch):
    good = _members(good_archive)
    base = [_file(n, d) for n, d in good.items()]

    def refused(entries, match):
        p = _tar(tmp_path / "bad.mext", entries)
        with pytest.raises(CheckpointError, match=match):
            LM.restore_from(p)

    refused(base + [_file("/etc/evil", b"x")], "outside the archive")
    refused(base + [_file("../evil", b"x")], "outside the archive")
    refused(base + [_file("tokenizer/../../evil", b"x")], "outside the archive")
    link = tarfile.TarInfo("tokenizer/sp.model")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    refused(base + [(link, None)], "link or special file")
    refused(base + [_file("extra.py", b"print(1)")], "unexpected member")
    refused([e for e in base if e[0].name != "model_weights.pt"], "no model_weights.pt")
    refused(base + [_file("config.yaml", b"model: {}\n")], "appears twice")
    # a modified member fails its checksum; one whose size differs from the manifest is refused before writing
    refused([_file(n, d.replace(b"model:", b"modeL:", 1) if n == "config.yaml" else d) for n, d in good.items()],
            "checksum")
    refused([_file(n, d + b"\n# edited\n" if n == "config.yaml" else d) for n, d in good.items()],
            "'config.yaml' declares .* bytes but manifest.json lists")
    # pickled code with a correct checksum: torch.load(weights_only=True) refuses it, nothing runs
    pwn = tmp_path / "pwned"
    monkeypatch.setenv("MEXT_PWN", str(pwn))
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1), "x": _Evil()}, buf)
    evil = buf.getvalue()
    manifest = json.loads(good["manifest.json"])
    import hashlib

    manifest["files"]["model_weights.pt"] = {"sha256": hashlib.sha256(evil).hexdigest(), "bytes": len(evil)}
    entries = [_file("manifest.json", json.dumps(manifest).encode()), _file("config.yaml", good["config.yaml"]),
               _file("model_weights.pt", evil)]
    refused(entries, "refused: model_weights.pt holds pickled objects")
    assert not pwn.exists()
    # not a tar at all / no such file
    (tmp_path / "junk.mext").write_bytes(b"\x00junk" * 100)
    with pytest.raises(CheckpointError, match="not a .mext archive"):
        LM.restore_from(str(tmp_path / "junk.mext"))
    with pytest.raises(CheckpointError, match="no such archive"):
        LM.restore_from(str(tmp_path / "missing.mext"))


def test_save_to_checks_its_inputs(tmp_path):
    lm = _lm("gpt")
    with pytest.raises(CheckpointError, match="must end in .mext"):
        lm.save_to(str(tmp_path / "m.tar"))
    lm.config["model"]["tokenizer"]["library"] = "sentencepiece"
    lm.config["model"]["tokenizer"]["model"] = str(tmp_path / "gone.model")
    with pytest.raises(CheckpointError, match="gone.model: file not found"):
        lm.save_to(str(tmp_path / "m.mext"))


def test_save_to_and_restore_model_for_a_bare_model_class(tmp_path):
    from megatron_ext.models.encoder_decoder import EncoderDecoderModel
    from megatron_ext.models.gpt import GPTModel

    lm = _lm("gpt")
    with pytest.raises(CheckpointError, match="pass them"):
        A.save_to(lm.model, str(tmp_path / "x.mext"))
    path = A.save_to(lm.model, str(tmp_path / "m.mext"), tokenizer=lm.tokenizer, config=lm.config)
    model = restore_model(path, GPTModel)
    assert isinstance(model, GPTModel) and model.tokenizer.vocab_size == lm.tokenizer.vocab_size
    x = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(x), lm.model(x))
    again = A.save_to(model, str(tmp_path / "again.mext"))  # carries its tokenizer and config
    assert LM.restore_from(again).family == "gpt"
    with pytest.raises(CheckpointError, match="not a EncoderDecoderModel"):
        restore_model(path, EncoderDecoderModel)
