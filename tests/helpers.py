"""Helpers shared by both test tiers (``tests/unit``, ``tests/integration``): repository paths, the tiny-GPT
overrides, subprocess launchers and environments, tiny in-memory models, and the in-process paths of the entry
points (``fit_in_process``, ``entry_error_in_process``) that tests use where they are not about the CLI itself.

Importable as ``helpers`` (pytest's ``pythonpath`` in pyproject.toml puts ``tests/`` on the path)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt")

# overrides of a GPT small enough for a training subprocess in a test
TINY_GPT = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "model.seq_length=32",
    "model.micro_batch_size=2",
    "model.global_batch_size=4",
    "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=1",
]

# the run of the session fixture ``gpt_zero3_dp2_run`` (conftest.py): 2 self-launched processes, ZeRO-3, plan_check
GPT_ZERO3_DP2_RUN = [
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4", "model.seq_length=32",
    "model.micro_batch_size=2", "model.global_batch_size=4", "trainer.log_every_n_steps=1",
    "trainer.limit_val_batches=2", "trainer.max_steps=6", "trainer.val_check_interval=6",
    "exp_manager.checkpoint_callback_params.every_n_train_steps=6", "model.optim.lr=3e-3", "trainer.devices=2",
    "model.zero_stage=3", "trainer.plan_check=true",
]


def free_port() -> int:
    """A port for a test's rendezvous: below the ephemeral range, as the self-launcher picks it (see there)."""
    from megatron_ext.parallel.state import _free_port

    return _free_port()


def multiprocess_env(**extra) -> dict:
    """The environment for multi-process (torchrun / gloo) test runs: no inherited rank variables, one OpenMP
    thread per rank (2 cores), no GPU, unbuffered output, the repo importable; ``extra`` added on top."""
    env = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu",
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def script_env(cache_home: str) -> dict:
    """The environment of a script run as a subprocess of a test (fixture ``run_env``): this one without the rank
    variables (an in-process run of a world of one sets them here), the session's XDG cache, unbuffered output."""
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = cache_home
    env["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    return env


# The interpreter for a test's subprocess runs: the session's fork-server shim (tests/forkserver; set by
# conftest.py) where it runs, else this interpreter. Read it at call time (``helpers.PYTHON``), not at import.
PYTHON = sys.executable


def launch_cmd(world: int, script_and_args) -> list:
    """``python SCRIPT ARGS`` for one process; torchrun with ``world`` local processes (free port) otherwise."""
    if world == 1:
        return [PYTHON] + list(script_and_args)
    return [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port())] + list(script_and_args)


def run_script(args, env, timeout=600, cwd=REPO, python=None):
    """Run a repo script in a subprocess (through the fork server, see ``PYTHON``, unless ``python`` names another
    interpreter); returns CompletedProcess with text output."""
    return subprocess.run([python or PYTHON] + list(args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def perturb(model, seed: int = 3, scale: float = 0.3):
    """Add seeded noise to every parameter, so no bias/norm is trivially 0/1 and an untrained model's predictions
    spread out (greedy outputs are not one repeated token). Returns the model."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def tiny_lm(family: str, *, seq_length: int = None, num_layers: int = 2, chunk_size: int = -1, **gpt_kw):
    """A small perturbed ``LM`` (byte tokenizer) of one family: "gpt" (``gpt_kw`` go to ModelConfig), "mega" or
    "encdec" (seq 12 -> 10)."""
    from megatron_ext.config.schema import (EncoderDecoderModelConfig, MegaArchConfig, ModelConfig,
                                            TransformerStackConfig)
    from megatron_ext.inference.lm import LM
    from megatron_ext.tokenizers import build_tokenizer

    tok = build_tokenizer("byte")
    if family == "gpt":
        from megatron_ext.models.gpt import GPTModel

        base = dict(num_layers=num_layers, hidden_size=32, num_attention_heads=4, seq_length=seq_length or 32,
                    hidden_dropout=0.1, attention_dropout=0.1, make_vocab_size_divisible_by=8)
        base.update(gpt_kw)
        model = perturb(GPTModel(ModelConfig(**base), tok.vocab_size, init_seed=1))
    elif family == "mega":
        from megatron_ext.models.mega_lm import MegaGPTModel

        cfg = ModelConfig(arch="mega", num_layers=num_layers, hidden_size=32, seq_length=seq_length or 16,
                          hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=8,
                          mega=MegaArchConfig(ema_projection_size=4, shared_representation_size=16,
                                              intermediate_size=32, nffn_hidden_size=32, ema_impl="fft",
                                              chunk_size=chunk_size))
        model = perturb(MegaGPTModel(cfg, tok.vocab_size, init_seed=2), scale=0.1)
    elif family == "encdec":
        from megatron_ext.models.encoder_decoder import EncoderDecoderModel

        common = dict(num_layers=num_layers, hidden_size=32, num_attention_heads=4, hidden_dropout=0.0,
                      attention_dropout=0.0)
        cfg = EncoderDecoderModelConfig(encoder=TransformerStackConfig(**common),
                                        decoder=TransformerStackConfig(**common), seq_length=12, seq_length_dec=10,
                                        make_vocab_size_divisible_by=8)
        model = perturb(EncoderDecoderModel(cfg, tok.vocab_size, init_seed=4))
    else:
        raise ValueError(family)
    return LM(model, tok, {})




GPT_CONFIGS = os.path.join(REPO, "configs", "gpt")


def compose_entry_config(overrides=(), config_dir: str = "configs/gpt", config_name: str = "megatron_gpt_config"):
    """The config an entry point's Hydra main receives for ``--config-path=config_dir --config-name=config_name
    OVERRIDES`` (the same defaults lists, groups such as ``+experiment=...`` and override grammar)."""
    from hydra import compose, initialize_config_dir

    from megatron_ext.config.loader import register_schemas

    register_schemas()
    with initialize_config_dir(config_dir=os.path.join(REPO, config_dir), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def fit_in_process(overrides=(), *, bart: bool = False, config_dir: str = None, config_name: str = None):
    """Train in this process (a world of one) as ``pretrain_gpt.py`` / ``pretrain_bart.py OVERRIDES`` would:
    Hydra's composition of the entry point's config, then ``Trainer(cfg, task).fit()``. Returns fit's result."""
    from megatron_ext.config.schema import BARTConfig, GPTConfig
    from megatron_ext.training.trainer import Trainer

    if bart:
        from megatron_ext.training.bart_task import BARTTask as task

        schema, cdir, cname = BARTConfig, "configs/bart", "megatron_bart_config"
    else:
        from megatron_ext.training.gpt_task import GPTTask as task

        schema, cdir, cname = GPTConfig, "configs/gpt", "megatron_gpt_config"
    cfg = compose_entry_config(overrides, config_dir or cdir, config_name or cname)
    return Trainer(cfg, task, schema=schema).fit()


def entry_error_in_process(overrides=(), **kw) -> str:
    """The ``error: ...`` line an entry point prints (exit status 2) for a bad input, reached in this process: the
    ``MegatronExtError`` that ``fit_in_process`` raises, as the entry point formats it. Fails the test when the
    run does not raise one, or when the message spans more than one line."""
    import pytest

    from megatron_ext.errors import MegatronExtError

    with pytest.raises(MegatronExtError) as ei:
        fit_in_process(overrides, **kw)
    line = f"error: {ei.value}"
    assert "\n" not in line.strip(), line
    return line


def run_main_in_process(main, args, capsys) -> subprocess.CompletedProcess:
    """Call a tool's ``main(argv)`` (``megatron_ext.cli.<tool>.main``) in this process: its exit status and what it
    printed, in the shape of ``subprocess.run``'s result (``returncode``, ``stdout``, ``stderr``), so a test asserts
    on it as on the tool's subprocess. ``capsys`` is pytest's fixture."""
    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's usage errors
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), rc, out, err)


def write_dataset(prefix: str, docs, dtype=None) -> str:
    """Write token lists as a Megatron .bin/.idx pair (one document per list; uint16 tokens by default)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16 if dtype is None else dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=np.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def text_docs(tok, texts):
    """Token lists of ``texts``, each ending with the tokenizer's end-of-document id."""
    return [tok.tokenize(t) + [tok.eod] for t in texts]


def marker_docs(tok, n):
    """Document i is '<iii>' five times, so every sample tells which documents it came from."""
    return text_docs(tok, [f"<{i:03d}>" * 5 for i in range(n)])


# ------------------------------------------------------------------ Hugging Face export (test_convert_to_hf*)
VOCAB = 259  # the byte tokenizer's; padded to 264 with make_vocab_size_divisible_by=8


TOL = 1e-4


NON_ASCII = ["héllo wörld, naïve café, Ærøskøbing", "日本語のテキスト、中文文本", "Привет, мир! Ελληνικά. עברית",
             "emoji 😀🎉👍🏽 ∑∫√∞", "full-width ＡＢＣ１２３ ligature ﬁ", "  two  spaces\tand tab\n"]


LLAMA = dict(position_embedding_type="rope", activation="swiglu", normalization="rmsnorm")


def shakespeare_lines(n=None):
    """tinyshakespeare lines when ../shared is there, else English text every Python ships (help topics), so a
    clean clone without ../shared trains the same kind of tokenizer."""
    if os.path.isfile(SHARED_DATA):
        with open(SHARED_DATA, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    else:
        from pydoc_data.topics import topics

        lines = [" ".join(p.split()) for k in sorted(topics) for p in topics[k].split("\n") if p.strip()]
        # prose lines only: a long run of one symbol ("=====") can segment differently in HF tokenizers than in
        # sentencepiece's unigram Viterbi (a known limit, README "Hugging Face export")
        lines = [t for t in lines if sum(c.isalpha() or c == " " for c in t) >= 0.7 * len(t)]
    return lines[:n] if n else lines


def tiny_cfg(**kw):
    """A small GPT ``ModelConfig`` (no dropout) with ``kw`` on top."""
    from megatron_ext.config.schema import ModelConfig

    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, hidden_dropout=0.0,
                attention_dropout=0.0, make_vocab_size_divisible_by=8)
    base.update(kw)
    return ModelConfig(**base)


def perturbed_model(cfg, vocab=VOCAB, seed=0):
    """A GPTModel whose every parameter is moved off its init (biases != 0, norm weights != 1)."""
    import torch

    from megatron_ext.models.gpt import GPTModel

    model = GPTModel(cfg, vocab, init_seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.2))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert p.abs().min() > 0, name
        if "layernorm" in name and name.endswith("weight"):
            assert (p - 1).abs().max() > 0.1, name
    return model


def our_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model.gather_logits(model(tokens))


def hf_logits(out_dir, tokens):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        return hf, hf(tokens).logits


def random_tokens(vocab=VOCAB, b=2, s=16, seed=3):
    import torch

    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def make_hf_tokenizer(out_dir, kind="gpt2", lines=None, vocab_size=None):
    """A tiny Hugging Face tokenizer directory (``tokenizer.json`` + ``tokenizer_config.json``) trained offline with
    the ``tokenizers`` library on ``lines`` (default: 3000 lines of :func:`shakespeare_lines`); returns ``out_dir``.

    * ``gpt2``: byte-level BPE like GPT-2's, ``<|endoftext|>`` (id 0) as bos / eos / unk, nothing added by
      ``AutoTokenizer`` (``tokenizer_class`` GPT2Tokenizer);
    * ``llama``: Llama-2 style BPE with byte fallback (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, the 256 ``<0xNN>`` byte
      pieces 3..258), a ``Metaspace`` pre-tokenizer (what transformers 5 builds for ``LlamaTokenizer``), a
      ``"<s> $A"`` post-processor (``AutoTokenizer`` puts ``<s>`` first) and ``add_bos_token: true`` as Llama-2's
      ``tokenizer_config.json`` says it.
    """
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    lines = list(lines) if lines is not None else shakespeare_lines(3000)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "tokenizer.json")

    def special(i, s):
        return {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}

    if kind == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.train_from_iterator(lines, trainers.BpeTrainer(
            vocab_size=vocab_size or 400, special_tokens=["<|endoftext|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.save(path)
        eot = "<|endoftext|>"
        cfg = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
               "add_prefix_space": False, "model_max_length": 1024,
               "added_tokens_decoder": {"0": {k: v for k, v in special(0, eot).items() if k != "id"}}}
    elif kind == "llama":
        specials = ["<unk>", "<s>", "</s>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size or 600, special_tokens=specials,
                                                           show_progress=False, limit_alphabet=120))
        spec = json.loads(tok.to_str())
        # the byte pieces are ordinary vocabulary entries (ids 3..258), as in Llama's tokenizer.json
        trained = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
        vocab = {s: i for i, s in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
        for piece, _ in trained:
            vocab.setdefault(piece, len(vocab))
        spec["model"]["vocab"] = vocab
        spec["added_tokens"] = [special(i, s) for i, s in enumerate(specials)]
        tok = Tokenizer.from_str(json.dumps(spec))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 1)])
        tok.save(path)
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
               "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "legacy": False,
               "model_max_length": 2048,
               "added_tokens_decoder": {str(i): {k: v for k, v in special(i, s).items() if k != "id"}
                                        for i, s in enumerate(specials)}}
    else:
        raise ValueError(f"kind={kind!r}: expected gpt2 or llama")
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return out_dir


def check_hf_tokenizer(out_dir, ours, texts):
    """The exported tokenizer (``AutoTokenizer`` from ``out_dir``) gives our ids on every text; returns it."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    bad = [t for t in texts if tok(t, add_special_tokens=False)["input_ids"] != ours.tokenize(t)]
    assert not bad, f"{len(bad)} of {len(texts)} texts differ, e.g. {bad[:3]!r}"
    assert tok(texts[0])["input_ids"] == ours.tokenize(texts[0])  # nothing added by default either
    return tok


# ------------------------------------------------------------------------------- Mega EMA (unit + kernel tests)
EMA_PARAMS = ("delta", "alpha", "beta", "gamma", "omega")
EMA_TOL = dict(atol=1e-5, rtol=1e-5)


def make_ema(embed_dim=8, ndim=16, bidirectional=False, truncation=None, impl="fft", seed=0, dtype=None):
    import torch

    from megatron_ext.modules.mega_ema import MultiHeadEMA

    dtype = torch.float32 if dtype is None else dtype
    torch.manual_seed(seed)
    m = MultiHeadEMA(embed_dim, ndim, bidirectional=bidirectional, truncation=truncation, impl=impl)
    return m.to(dtype)


def random_mask(bsz, seq_len, seed=1):
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(bsz, seq_len, generator=g) > 0.3
    mask[:, 0] = True
    return mask


def split_points(seq_len, sizes):
    out, start, i = [], 0, 0
    while start < seq_len:
        end = min(seq_len, start + sizes[i % len(sizes)])
        out.append((start, end))
        start, i = end, i + 1
    return out


def greedy_ids(lm, ids, n):
    """``ids`` followed by ``n`` greedy tokens of ``lm`` (full forward each step, no cache): a reference that does
    not go through the generation code."""
    import torch

    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = lm.model.gather_logits(lm.model(torch.tensor([ids])))
            ids.append(int(logits[0, -1].argmax()))
    return ids
