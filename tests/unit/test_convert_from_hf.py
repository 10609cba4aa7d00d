"""Hugging Face import (megatron_ext/inference/hf_import.py, tools/convert_from_hf.py): tiny random GPT-2 and Llama
models made here give HF's logits and greedy tokens once imported, go back to HF as identical tensors, continue
pretraining from the archive; bad directories give one clear error each."""
import json
import os
import shutil

import pytest
import torch

from helpers import VOCAB, fit_in_process, run_main_in_process, TINY_GPT

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from megatron_ext.cli import convert_from_hf, convert_to_hf  # noqa: E402
from megatron_ext.errors import CheckpointError, ConfigError  # noqa: E402
from megatron_ext.inference.hf_import import import_from_hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("tp1_one_thread")

TOL = 1e-4


def _perturb(model, seed=0):
    """Move every HF parameter off its init (norm weights != 1, biases != 0), so the comparison sees each one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.2))
    return model


def make_gpt2(path, **kw):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-4,
                                  bos_token_id=None, eos_token_id=None, **kw)
    torch.manual_seed(0)
    model = _perturb(transformers.GPT2LMHeadModel(cfg).eval())
    model.save_pretrained(str(path))
    return model


def make_llama(path, **kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 500.0}, bos_token_id=None,
                eos_token_id=None, pad_token_id=None)
    base.update(kw)
    torch.manual_seed(1)
    model = _perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval(), seed=1)
    model.save_pretrained(str(path))
    return model


def _hf_tensors(d):
    from safetensors.torch import load_file

    return load_file(os.path.join(d, "model.safetensors"))


def check_import(tmp_path, capsys, hf, hf_dir, name):
    """Import to .mext through the tool; logits, greedy generation and the way back through tools/convert_to_hf."""
    from megatron_ext.inference.generation import generate
    from megatron_ext.inference.lm import LM

    out = str(tmp_path / f"{name}.mext")
    r = run_main_in_process(convert_from_hf.main, ["--input", str(hf_dir), "--output", out,
                                                   "--tokenizer-library", "byte"], capsys)
    assert r.returncode == 0, r.stderr
    assert f"model.ckpt_path={out}" in r.stdout and "model.num_layers=2" in r.stdout
    lm = LM.restore_from(out)
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = lm.model.gather_logits(lm.model(tokens))
    diff = (got - ref).abs().max().item()
    print(f"{name}: imported logits vs transformers: max |diff| = {diff:.2e}")
    assert got.shape == ref.shape and diff <= TOL and ref.std() > 0.1
    # greedy generation, token for token (no stop token on either side)
    prompt = tokens[0, :6].tolist()
    ids = torch.tensor([prompt])
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                       min_new_tokens=12, eos_token_id=None, pad_token_id=VOCAB - 1)[0, 6:].tolist()
    mine = generate(lm, [prompt], max_new_tokens=12, greedy=True, stop_tokens=[], output="tokens")[0]
    assert list(mine) == want, (mine, want)
    # HF -> ours -> HF: the same tensors
    back = tmp_path / f"{name}_back"
    r = run_main_in_process(convert_to_hf.main, ["--input", out, "--output", str(back)], capsys)
    assert r.returncode == 0, r.stderr
    a, b = _hf_tensors(hf_dir), _hf_tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    src = json.loads((hf_dir / "config.json").read_text())
    dst = json.loads((back / "config.json").read_text())
    return lm, src, dst


def test_gpt2_import(tmp_path, capsys):
    hf_dir = tmp_path / "hf_gpt2"
    hf = make_gpt2(hf_dir)
    lm, src, dst = check_import(tmp_path, capsys, hf, hf_dir, "gpt2")
    mc = lm.model.config
    assert (mc.activation, mc.layernorm_epsilon, mc.max_position_embeddings) == ("gelu_tanh", 1e-4, 32)
    assert lm.model.padded_vocab_size == 384  # 259 rows padded with zeros to a multiple of 128
    for k in ("activation_function", "n_positions", "n_embd", "layer_norm_epsilon", "tie_word_embeddings"):
        assert src[k] == dst[k], k


def test_llama_import(tmp_path, capsys):
    hf_dir = tmp_path / "hf_llama"
    hf = make_llama(hf_dir)
    lm, src, dst = check_import(tmp_path, capsys, hf, hf_dir, "llama")
    assert (lm.model.config.rotary_base, lm.model.config.share_embeddings_and_output_weights) == (500.0, False)
    for k in ("rope_parameters", "rms_norm_eps", "intermediate_size", "num_key_value_heads", "tie_word_embeddings"):
        assert src[k] == dst[k], k


def test_llama_gqa_import(tmp_path, capsys):
    hf_dir = tmp_path / "hf_gqa"
    hf = make_llama(hf_dir, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    lm, src, dst = check_import(tmp_path, capsys, hf, hf_dir, "gqa")
    assert lm.model.config.num_query_groups == 2 and dst["num_key_value_heads"] == 2


def test_continue_pretraining_from_imported_archive(tmp_path, capsys, in_process, monkeypatch):
    """pretrain_gpt.py model.ckpt_path=imported.mext (weights only) trains, starting from the imported weights;
    a run whose architecture keys differ from the archive's is refused naming the key."""
    monkeypatch.chdir(tmp_path)
    hf_dir = tmp_path / "hf"
    make_llama(hf_dir, tie_word_embeddings=True, num_hidden_layers=1, max_position_embeddings=32)
    out = str(tmp_path / "imp.mext")
    r = run_main_in_process(convert_from_hf.main, ["--input", str(hf_dir), "--output", out,
                                                   "--tokenizer-library", "byte"], capsys)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1].split("pretrain_gpt.py ", 1)[1].split()
    keep = [o for o in TINY_GPT if not o.startswith(("model.num_layers", "model.hidden_size",
                                                     "model.num_attention_heads"))]
    overrides = line + keep + [f"exp_manager.exp_dir={tmp_path / 'exp'}", "trainer.max_steps=3",
                               "trainer.val_check_interval=3", "model.optim.lr=1e-3"]
    res = fit_in_process(overrides)
    metrics = [json.loads(x) for x in open(os.path.join(res["run_dir"], "metrics.jsonl"))]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert len(losses) == 3 and all(map(lambda v: v == v, losses))
    import math
    assert losses[0] < 0.9 * math.log(VOCAB) or losses[0] > 1.1 * math.log(VOCAB)  # the weights are not an init's
    bad = [o if not o.startswith("model.layernorm_epsilon") else "model.layernorm_epsilon=0.001" for o in overrides]
    with pytest.raises(CheckpointError, match="model.layernorm_epsilon=1e-05 but this model has "
                                              "model.layernorm_epsilon=0.001"):
        fit_in_process(bad)


# --------------------------------------------------------------------------------------------- other inputs
def _variant(base, tmp_path, name, config=None, tensors=None):
    """A copy of the HF directory ``base`` with config.json keys replaced (``None`` removes) and/or other tensors."""
    from safetensors.torch import save_file

    d = tmp_path / name
    shutil.copytree(base, d)
    if config is not None:
        c = json.loads((d / "config.json").read_text())
        for k, v in config.items():
            c.pop(k, None) if v is None else c.__setitem__(k, v)
        (d / "config.json").write_text(json.dumps(c))
    if tensors is not None:
        save_file(tensors, str(d / "model.safetensors"))
    return d


def test_sharded_bin_gives_the_safetensors_weights(tmp_path):
    base = tmp_path / "st"
    make_gpt2(base)
    ref = import_from_hf(str(base))["state_dict"]
    sd = _hf_tensors(base)
    names = sorted(sd)
    d = _variant(base, tmp_path, "bin")
    os.remove(d / "model.safetensors")
    half = len(names) // 2
    wm = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, str(d / fname))
        wm.update({k: fname for k in part})
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    got = import_from_hf(str(d))["state_dict"]
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_bad_inputs_one_clear_error_each(tmp_path, capsys):
    base = tmp_path / "gpt2"
    make_gpt2(base)
    sd = _hf_tensors(base)
    llama = tmp_path / "llama"
    make_llama(llama, num_hidden_layers=1)
    cases = []

    def case(path, pattern, exc=(ConfigError, CheckpointError)):
        cases.append((str(path), pattern, exc))

    f = tmp_path / "file.txt"
    f.write_text("x")
    case(f, "not a directory")
    case(tmp_path / "nope", "no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    case(empty, "no config.json")
    case(_variant(base, tmp_path, "bert", {"model_type": "bert"}), r"model_type='bert': cannot be imported")
    case(_variant(base, tmp_path, "cls", {"architectures": ["GPT2ForSequenceClassification"]}),
         "GPT2ForSequenceClassification cannot be imported")
    case(_variant(base, tmp_path, "relu", {"activation_function": "relu"}), "activation_function='relu': not supp")
    case(_variant(base, tmp_path, "idx", {"scale_attn_by_inverse_layer_idx": True}),
         "scale_attn_by_inverse_layer_idx=True: not supported")
    case(_variant(llama, tmp_path, "scaling", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
         "rope_scaling=.*not supported")
    case(_variant(llama, tmp_path, "yarn", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}),
         "rope_parameters.rope_type='yarn': not supported")
    case(_variant(llama, tmp_path, "bias", {"attention_bias": True}), "attention_bias=True with mlp_bias=False")
    case(_variant(llama, tmp_path, "act", {"hidden_act": "gelu"}), "hidden_act='gelu': not supported")
    case(_variant(llama, tmp_path, "hd", {"head_dim": 32}), "head_dim=32: not supported")
    case(_variant(base, tmp_path, "neg", {"n_layer": -1}), "n_layer=-1: expected an integer >= 1")
    miss = dict(sd)
    miss.pop("transformer.h.1.mlp.c_fc.bias")
    case(_variant(base, tmp_path, "missing", tensors=miss), "missing tensor transformer.h.1.mlp.c_fc.bias")
    case(_variant(base, tmp_path, "extra", tensors={**sd, "transformer.h.2.ln_1.weight": torch.ones(64)}),
         "unexpected tensor transformer.h.2.ln_1.weight")
    case(_variant(base, tmp_path, "shape", tensors={**sd, "transformer.wpe.weight": torch.zeros(16, 64)}),
         r"transformer.wpe.weight has shape \[16, 64\], expected \[32, 64\]")
    esc = _variant(base, tmp_path, "escape")
    os.rename(esc / "model.safetensors", tmp_path / "outside.safetensors")
    (esc / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "../outside.safetensors" for k in sd}}))
    case(esc, r"shard '../outside.safetensors' is not a file name inside")
    link = _variant(base, tmp_path, "link")
    os.remove(link / "model.safetensors")
    os.symlink(tmp_path / "outside.safetensors", link / "w.safetensors")
    (link / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "w.safetensors" for k in sd}}))
    case(link, "shard 'w.safetensors' leads outside the model directory")
    evil = _variant(base, tmp_path, "evil")
    os.remove(evil / "model.safetensors")
    torch.save({"transformer.wte.weight": torch.zeros(VOCAB, 64), "x": _Evil()}, str(evil / "pytorch_model.bin"))
    case(evil, "refused: Hugging Face weights file holds pickled objects .*posix.system|refused: .*system")
    trunc = _variant(base, tmp_path, "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    case(trunc, "not a readable safetensors file")
    for path, pattern, exc in cases:
        with pytest.raises(exc, match=pattern):
            import_from_hf(path)
    # through the tool: one line, exit status 2
    r = run_main_in_process(convert_from_hf.main, ["--input", cases[0][0], "--output", str(tmp_path / "o.mext"),
                                                   "--tokenizer-library", "byte"], capsys)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "convert_from_hf: error: " in r.stderr, r.stderr
    big = _variant(base, tmp_path, "vocab", {"vocab_size": 300},
                   tensors={**sd, "transformer.wte.weight": torch.zeros(300, 64)})
    r = run_main_in_process(convert_from_hf.main, ["--input", str(big), "--output", str(tmp_path / "o.mext"),
                                                   "--tokenizer-library", "byte"], capsys)
    assert r.returncode == 2 and "the tokenizer has 259 ids but the model's config.json has vocab_size=300" \
        in r.stderr, r.stderr
    (tmp_path / "exists.mext").write_text("mine")
    r = run_main_in_process(convert_from_hf.main, ["--input", str(base), "--output", str(tmp_path / "exists.mext"),
                                                   "--tokenizer-library", "byte"], capsys)
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr
    assert (tmp_path / "exists.mext").read_text() == "mine"
    r = run_main_in_process(convert_from_hf.main, ["--input", str(base), "--output", str(tmp_path / "o.mext"),
                                                   "--target-tp", "2"], capsys)
    assert r.returncode == 2 and "--target-tp=2: a .mext / .pt output has no layout" in r.stderr


def test_tokenizer_json_in_the_directory_is_the_default_tokenizer(tmp_path, capsys):
    """Without --tokenizer-library, the directory's tokenizer.json (model.tokenizer.library=huggingface) goes into the
    archive and is the restored model's tokenizer; the printed line names it."""
    from megatron_ext.inference.lm import LM

    from helpers import make_hf_tokenizer, shakespeare_lines

    hf_dir = tmp_path / "hf"
    make_hf_tokenizer(str(hf_dir), "llama", lines=shakespeare_lines(300), vocab_size=320)
    vocab = len(json.loads((hf_dir / "tokenizer.json").read_text())["model"]["vocab"])
    make_llama(hf_dir, vocab_size=vocab, num_hidden_layers=1)
    out = str(tmp_path / "tok.mext")
    r = run_main_in_process(convert_from_hf.main, ["--input", str(hf_dir), "--output", out], capsys)
    assert r.returncode == 0, r.stderr
    assert f"model.tokenizer.library=huggingface model.tokenizer.model={hf_dir}" in r.stdout
    lm = LM.restore_from(out)
    auto = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    text = "To be, or not to be: that is the question."
    assert lm.tokenizer.vocab_size == vocab and lm.tokenizer.tokenize(text) == auto(text)["input_ids"]


def test_continue_pretraining_a_mega_archive(tmp_path, capsys, in_process, monkeypatch):
    """An imported HF Mega (.mext, tests/data/hf_mega) starts a model.arch=mega run through model.ckpt_path with its
    printed model config; another model.mega key is refused naming it."""
    monkeypatch.chdir(tmp_path)
    fix = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "hf_mega", "causal_rotary")
    out = str(tmp_path / "mega.mext")
    r = run_main_in_process(convert_from_hf.main, ["--input", fix, "--output", out, "--tokenizer-library", "byte"],
                            capsys)
    assert r.returncode == 0, r.stderr
    mc = json.loads(r.stdout.strip().splitlines()[-1].split(": ", 2)[2])
    skip = ("tokenizer", "data", "optim", "micro_batch_size", "global_batch_size", "ckpt_path")

    def flat(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            elif prefix != "model." or k not in skip:
                yield f"{prefix}{k}={'null' if v is None else json.dumps(v) if isinstance(v, str) else v}"
    overrides = list(flat(mc, "model.")) + [
        f"model.ckpt_path={out}", "model.micro_batch_size=2", "model.global_batch_size=2", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "trainer.limit_val_batches=1", f"exp_manager.exp_dir={tmp_path / 'exp'}"]
    res = fit_in_process(overrides, config_dir="configs/mega", config_name="gpt_mega")
    metrics = [json.loads(x) for x in open(os.path.join(res["run_dir"], "metrics.jsonl"))]
    assert len([m for m in metrics if "train/loss" in m]) == 2
    bad = [o for o in overrides if not o.startswith("model.mega.shared_representation_size")]
    with pytest.raises(CheckpointError, match="model.mega.shared_representation_size=8 but this model has "
                                              "model.mega.shared_representation_size=64"):
        fit_in_process(bad + [f"exp_manager.exp_dir={tmp_path / 'exp2'}"], config_dir="configs/mega",
                       config_name="gpt_mega")
