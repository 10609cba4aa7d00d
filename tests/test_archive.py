""".mext archives: save_to / restore_from for every model family, tokenizer carried, malicious archives refused,
export from real runs (ZeRO-3 DP2 and TP2 checkpoints) reproducing the logged val/loss and the same greedy output,
live save_to gathered from TP2 shards, restore at TP2."""
import io
import json
import os
import subprocess
import tarfile

import pytest
import torch

from helpers import GPT_ZERO3_DP2_RUN, REPO, launch_cmd, multiprocess_env, perturb, run_main_in_process, run_script
from megatron_ext.config.loader import load_config
from megatron_ext.config.schema import BARTConfig
from megatron_ext.errors import CheckpointError
from megatron_ext.inference.lm import LM
from megatron_ext.parallel.state import initialize_parallel
from megatron_ext.training import archive as A

WORKER = os.path.join(REPO, "tests", "workers", "archive_tp_worker.py")

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


def _greedy(lm, ids, n):
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = lm.model.gather_logits(lm.model(torch.tensor([ids])))
            ids.append(int(logits[0, -1].argmax()))
    return ids


MEGA = ["model.arch=mega", "model.mega.shared_representation_size=16", "model.mega.intermediate_size=32",
        "model.mega.nffn_hidden_size=32", "model.mega.ema_projection_size=4", "model.mega.normalization_type=batchnorm"]


@pytest.mark.parametrize("family,over", [
    ("gpt", []),
    ("gpt", ["model.position_embedding_type=rope", "model.normalization=rmsnorm", "model.activation=swiglu",
             "model.share_embeddings_and_output_weights=false", "model.bias=false"]),
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
        assert len(set(_greedy(lm, [5, 6, 7], 8)[3:])) > 1  # a meaningful comparison: not one repeated token
        assert _greedy(lm, [5, 6, 7], 8) == _greedy(back, [5, 6, 7], 8)
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


# ------------------------------------------------------------------------------------------- from real runs
def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


RUN = [o for o in GPT_ZERO3_DP2_RUN if o != "model.zero_stage=3"]  # 2 self-launched processes, 6 steps


@pytest.mark.parametrize("layout", [["model.zero_stage=3"], ["model.tensor_model_parallel_size=2"]],
                         ids=["zero3_dp2", "tp2"])
def test_export_from_run_reproduces_val_loss_and_greedy(tmp_path, run_env, layout, request, capsys):
    """ZeRO-3: the session's shared run (helpers.GPT_ZERO3_DP2_RUN = RUN + ZeRO-3), exported through the tool's
    CLI; TP2: a run of its own, exported through the same main in-process."""
    from megatron_ext.cli.export_archive import main as export_main
    from megatron_ext.inference.runs import validation_loss, verify_stable_load

    if layout == ["model.zero_stage=3"]:
        run_dir = str(request.getfixturevalue("gpt_zero3_dp2_run"))
    else:
        r = run_script(["pretrain_gpt.py", *RUN, *layout, f"exp_manager.exp_dir={tmp_path}",
                        "exp_manager.version=v"], run_env)
        assert r.returncode == 0, r.stderr[-3000:]
        run_dir = str(tmp_path / "megatron_gpt" / "v")
    logged = [m["val/loss"] for m in _metrics(run_dir) if "val/loss" in m and m["step"] == 6]
    assert len(logged) == 1
    out = str(tmp_path / "run.mext")
    if layout == ["model.zero_stage=3"]:
        r = run_script(["tools/export_archive.py", "--input", run_dir, "--output", out], run_env)
    else:
        r = run_main_in_process(export_main, ["--input", run_dir, "--output", out], capsys)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 6" in r.stdout
    lm = LM.restore_from(out)  # one CPU process, TP=1
    assert lm.info["source"]["step"] == 6
    assert abs(validation_loss(lm) - logged[0]) < 1e-5
    report = verify_stable_load(run_dir)  # the run directory directly, same figure
    assert report["abs_diff"] < 1e-5 and report["deterministic"]
    direct = A.restore_from_checkpoint(run_dir)
    assert _greedy(lm, [10, 20, 30], 12) == _greedy(direct, [10, 20, 30], 12)
    if "tensor_model_parallel_size=2" in layout[0]:
        # restore the archive at TP2 (2 processes): same loss and greedy; a live save_to there gathers the shards
        res = tmp_path / "tp2.json"
        proc = subprocess.run(launch_cmd(2, [WORKER, out, str(tmp_path / "from_tp2.mext"), str(res)]), cwd=REPO,
                              env=multiprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        got = json.loads(res.read_text())
        assert got["tp"] == 2
        assert abs(got["val_loss"] - logged[0]) < 1e-5
        assert got["greedy"] == _greedy(lm, [10, 20, 30], 12)
        regathered = A.read_archive(str(tmp_path / "from_tp2.mext"))["state_dict"]
        original = A.read_archive(out)["state_dict"]
        assert regathered.keys() == original.keys()
        for k in original:
            assert torch.equal(regathered[k], original[k]), k


def test_export_archive_cli_errors(tmp_path, run_env):
    r = run_script(["tools/export_archive.py", "--input", str(tmp_path / "nope"), "--output", "x.mext"], run_env)
    assert r.returncode == 2 and "not a directory" in r.stderr
    r = run_script(["tools/export_archive.py", "--input", str(tmp_path), "--output", str(tmp_path / "x.mext")],
                   run_env)
    assert r.returncode == 2 and "error:" in r.stderr


def test_save_to_from_a_pipeline(tmp_path):
    """PP=2 stages (2 processes) -> one archive under the plain model's names == the same config built at TP1."""
    out = str(tmp_path / "pp.mext")
    proc = subprocess.run(launch_cmd(2, [WORKER, "--pipeline", out]), cwd=REPO, env=multiprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from megatron_ext.training.gpt_task import GPTTask

    cfg = load_config(overrides=["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                                 "model.seq_length=16"])
    ref = GPTTask(cfg, torch.device("cpu")).build_model()
    back = LM.restore_from(out)
    assert back.family == "gpt" and back.config["model"]["pipeline_model_parallel_size"] == 1
    sd, ref_sd = back.model.state_dict(), ref.state_dict()
    assert set(sd) == set(ref_sd)
    vocab = ref.vocab_size
    for k in ref_sd:
        if k.endswith("_extra_state"):
            continue
        a, b = sd[k], ref_sd[k]
        if k.endswith(A.VOCAB_SUFFIXES):
            a, b = a[:vocab], b[:vocab]
        assert torch.equal(a, b), k


def test_save_to_and_restore_from_on_the_model_classes(tmp_path):
    from megatron_ext.models.encoder_decoder import EncoderDecoderModel
    from megatron_ext.models.gpt import GPTModel

    lm = _lm("gpt")
    with pytest.raises(CheckpointError, match="pass them"):
        lm.model.save_to(str(tmp_path / "x.mext"))
    path = lm.model.save_to(str(tmp_path / "m.mext"), tokenizer=lm.tokenizer, config=lm.config)
    model = GPTModel.restore_from(path)
    assert isinstance(model, GPTModel) and model.tokenizer.vocab_size == lm.tokenizer.vocab_size
    x = torch.randint(0, 200, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(x), lm.model(x))
    again = model.save_to(str(tmp_path / "again.mext"))  # carries its tokenizer and config
    assert LM.restore_from(again).family == "gpt"
    with pytest.raises(CheckpointError, match="not a EncoderDecoderModel"):
        EncoderDecoderModel.restore_from(path)
