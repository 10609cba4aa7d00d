import os
import socket
import subprocess
import sys

import pytest

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def launch_cmd(world: int, script_and_args) -> list:
    """``python SCRIPT ARGS`` for one process; torchrun with ``world`` local processes (free port) otherwise."""
    if world == 1:
        return [sys.executable] + list(script_and_args)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port())] + list(script_and_args)


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory):
    """One XDG cache for the whole session (the built-in corpus is built once), never the user's ~/.cache."""
    return str(tmp_path_factory.mktemp("xdg_cache"))


@pytest.fixture
def run_env(cache_home):
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = cache_home
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    for k in ("LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    return env


def run_script(args, env, timeout=600, cwd=REPO):
    """Run a repo script in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable] + list(args), cwd=cwd, env=env, capture_output=True, text=True,
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


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny models: OpenMP barriers cost more than the math), restored after so
    the setting never leaks into later tests of the session."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tp1_one_thread():
    """For in-process model tests: megatron-core's parallel state at TP1 x PP1 in this process, and torch on one
    thread for the module (restored after)."""
    import torch

    from megatron_ext.parallel.state import initialize_parallel

    initialize_parallel(1, 1, accelerator="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
