import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "tinyshakespeare.txt")


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
