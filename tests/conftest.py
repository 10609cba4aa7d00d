"""Fixtures shared by both test tiers; plain helpers live in ``helpers.py`` (import them from there).

Subprocess runs of the tests go through one fork server per session (``tests/forkserver``, ``helpers.PYTHON``).
``TORCH_EXTENSIONS_DIR`` defaults to ``<checkout>/.cache/torch_extensions`` (gitignored) for the test session and
every subprocess it starts: DeepSpeed's JIT ops (``cpu_adam``, ``fused_adam``) are built once per checkout, not
once per session; ``MEGATRON_EXT_KERNELS_CACHE`` (the EMA kernels) defaults to ``<checkout>/.cache/kernels``. Values
set by the caller are kept."""
import os
import signal
import subprocess
import sys

import pytest

import helpers
from helpers import REPO, script_env

os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions"))
# the fused EMA kernels (megatron_ext.kernels) likewise: once per checkout, never in the user's ~/.cache
os.environ.setdefault("MEGATRON_EXT_KERNELS_CACHE", os.path.join(REPO, ".cache", "kernels"))

_FORKSERVER = None


def pytest_configure(config):
    """One fork server per session (tests/forkserver): a test's ``python ...`` subprocess skips the import of the
    training stack. ``helpers.PYTHON`` is its shim while it runs."""
    global _FORKSERVER
    import forkserver

    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller runs no test: each worker starts its own server
    _FORKSERVER = forkserver.start()
    if _FORKSERVER is not None:
        helpers.PYTHON = _FORKSERVER.python


def pytest_unconfigure(config):
    if _FORKSERVER is not None:
        _FORKSERVER.stop()
        helpers.PYTHON = helpers.sys.executable
    if _PREBUILD is not None and _PREBUILD.poll() is None:  # a short session that needed no op: stop the build
        os.killpg(_PREBUILD.pid, signal.SIGTERM)  # (its torch lock is cleared by the next builder: BuildLock)
        _PREBUILD.wait()


# the longest integration modules (a few minutes of the suite together) start first, so that the two pytest-xdist
# workers finish together rather than one waiting for the other's last long module; those that need DeepSpeed's
# ops (test_optim, test_reshard's CPU offload) stay later, when the background build (below) is done
LONG_FIRST = ("test_launch.py", "test_preemption.py", "test_watchdog_runs.py", "test_synthetic_train.py",
              "test_bench_scaling.py", "test_parallel_equivalence.py")


def pytest_collection_modifyitems(session, config, items):
    """The in-process tier first, then the subprocess tier (its longest modules first, the rest in collection
    order): quick failures come first, and DeepSpeed's ops build in the background (below) meanwhile."""
    def key(item):
        if os.sep + "unit" + os.sep in str(item.path):
            return 0, 0
        name = item.path.name
        return 1, (LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST))
    items.sort(key=key)


# DeepSpeed's JIT ops and our CPU EMA kernel, built by one background process started with the session when
# integration tests are collected: a cold checkout's builds (~1 minute of compiler time) overlap the in-process tier
# instead of stalling the first test that needs them. Every builder holds the op's BuildLock (megatron_ext.kernels), so a test that
# needs an op before it is done waits for it (saying so after 10 s) and then loads the built op.
PREBUILD_OPS = ("cpu_adam", "fused_adam")
_PREBUILD_SCRIPT = """
import megatron_ext
from megatron_ext.kernels import build
from megatron_ext.training.optim import AVAILABLE_OPTIMIZERS, _load_deepspeed_op
print("ema cpu kernel", build(cuda=False)["cpu"], flush=True)
for name in %r:
    if name in AVAILABLE_OPTIMIZERS:
        print(name, _load_deepspeed_op(name) or "ok", flush=True)
""" % (PREBUILD_OPS,)
_PREBUILD = None


def pytest_collection_finish(session):
    global _PREBUILD
    if os.environ.get("MEGATRON_EXT_TEST_PREBUILD") == "0" or session.config.option.collectonly:
        return
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return  # with pytest-xdist, the first worker builds for all
    if not any(os.sep + "integration" + os.sep in str(item.path) for item in session.items):
        return
    os.makedirs(os.path.join(REPO, ".cache"), exist_ok=True)  # (gitignored)
    log = open(os.path.join(REPO, ".cache", "prebuild_ops.log"), "w")  # what it built, or why not
    _PREBUILD = subprocess.Popen([sys.executable, "-c", _PREBUILD_SCRIPT], stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))


@pytest.fixture(scope="session")
def prebuilt_ops():
    """DeepSpeed's ops built, and no build of them running anywhere (for a test that plays with their build
    locks): this session's background build finished, or -- on another pytest-xdist worker than the one that
    started it -- the same script run here, which waits on the build locks and returns once the ops are built."""
    try:
        if _PREBUILD is not None:
            _PREBUILD.wait(timeout=900)
        else:
            subprocess.run([sys.executable, "-c", _PREBUILD_SCRIPT], stdin=subprocess.DEVNULL, capture_output=True,
                           timeout=900, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        pytest.fail(f"building DeepSpeed's ops {PREBUILD_OPS} took more than 900 s")


@pytest.fixture(scope="session")
def cache_home(tmp_path_factory):
    """One XDG cache for the whole session (the built-in corpus is built once), never the user's ~/.cache."""
    return str(tmp_path_factory.mktemp("xdg_cache"))


@pytest.fixture
def run_env(cache_home):
    return script_env(cache_home)


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


@pytest.fixture
def in_process(cache_home, monkeypatch):
    """For training in this process (``helpers.fit_in_process``): the session's XDG cache (the built-in corpus is
    built once, never in the user's ~/.cache), torch on one thread; both restored after the test."""
    import torch

    monkeypatch.setenv("XDG_CACHE_HOME", cache_home)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gpt_zero3_dp2_run(tmp_path_factory, cache_home):
    """One tiny GPT run trained by 2 processes with ZeRO-3 (6 steps; val/loss and a checkpoint at step 6), shared
    by the tests that need a trained multi-process run rather than a particular one (archive export, checkpoint
    consolidation). Returns its run directory; tests read it and write elsewhere."""
    from helpers import GPT_ZERO3_DP2_RUN, run_script

    exp = tmp_path_factory.mktemp("zero3_dp2")
    r = run_script(["pretrain_gpt.py", *GPT_ZERO3_DP2_RUN, f"exp_manager.exp_dir={exp}", "exp_manager.version=v"],
                   script_env(cache_home))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (exp / "megatron_gpt" / "v" / "test_run_output.txt").write_text(r.stdout + r.stderr)  # the run's log lines
    return exp / "megatron_gpt" / "v"


@pytest.fixture(scope="session")
def spm_models(tmp_path_factory):
    """Two sentencepiece models (unigram; BPE with byte fallback) with a ``<mask>`` symbol, trained once per
    session on English and non-ASCII text (test_convert_to_hf and test_convert_to_hf_cli)."""
    from helpers import NON_ASCII, shakespeare_lines
    from megatron_ext.tokenizers import train_sentencepiece

    d = tmp_path_factory.mktemp("spm")
    sentences = (shakespeare_lines(4000) or ["To be, or not to be, that is the question."] * 50) + NON_ASCII * 20
    mask = {"user_defined_symbols": ["<mask>"]}  # always one piece, also inside words
    uni = train_sentencepiece(str(d / "uni"), 320, sentences=sentences, model_type="unigram",
                              character_coverage=1.0, extra_options=mask)
    bpe = train_sentencepiece(str(d / "bpe"), 600, sentences=sentences, model_type="bpe", byte_fallback=True,
                              character_coverage=0.98, extra_options=mask)
    return {"unigram": uni, "bpe-bytefallback": bpe}


@pytest.fixture(scope="session")
def hf_tokenizer_dirs(tmp_path_factory):
    """Two tiny Hugging Face tokenizer directories trained once per session with the ``tokenizers`` library
    (helpers.make_hf_tokenizer): ``gpt2`` (byte-level BPE, nothing added around a text) and ``llama`` (BPE with byte
    fallback, ``add_bos_token: true``)."""
    from helpers import make_hf_tokenizer

    d = tmp_path_factory.mktemp("hf_tok")
    return {kind: make_hf_tokenizer(str(d / kind), kind) for kind in ("gpt2", "llama")}
