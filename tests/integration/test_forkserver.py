"""The suite's fork server (tests/forkserver) runs a command as a real interpreter would: argv, ``__file__``,
``sys.path``, environment, cwd, stdin/stdout/stderr, exit status, death by signal, signals forwarded, parent pid,
resource limits, fresh random seeds; and it hands to the real interpreter what it cannot run faithfully."""
import os
import signal
import subprocess
import sys
import time

import pytest

import helpers

pytestmark = pytest.mark.skipif(helpers.PYTHON == sys.executable, reason="the fork server is off in this session")

PROBE = r"""
import json, os, resource, sys
import torch
print(json.dumps({"argv": sys.argv, "file": __file__, "path0": sys.path[0], "cwd": os.getcwd(),
                  "env": os.environ.get("FORKSERVER_PROBE"), "executable": sys.executable, "ppid": os.getppid(),
                  "threads": torch.get_num_threads(), "seed": torch.initial_seed(), "name": __name__,
                  "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "umask": os.umask(0o22),
                  "stdin": sys.stdin.read(), "real": "torch" in sys.modules}))
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


def _wait_ready(timeout=60):
    ready = os.path.join(os.path.dirname(helpers.PYTHON), "ready")
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        assert time.monotonic() < deadline, f"the fork server did not get ready in {timeout} s"
        time.sleep(0.2)


def _forked(tmp_path):
    """Commands the server ran (its log lists each forked pid and command)."""
    with open(os.path.join(os.path.dirname(helpers.PYTHON), "server.log")) as f:
        return [line for line in f if " pid " in line]


def test_a_script_runs_as_in_a_fresh_interpreter(tmp_path):
    import json

    _wait_ready()
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    n_before = len(_forked(tmp_path))

    def run(python, *args, env_extra=None):
        env = dict(os.environ, FORKSERVER_PROBE="x", OMP_NUM_THREADS="1", **(env_extra or {}))
        return subprocess.run([python, "probe.py", *args], cwd=tmp_path, env=env, input="from stdin",
                              capture_output=True, text=True, timeout=120,
                              preexec_fn=lambda: __import__("resource").setrlimit(
                                  __import__("resource").RLIMIT_NOFILE, (200, 200)))

    real, ours = run(sys.executable, "7", "a b"), run(helpers.PYTHON, "7", "a b")
    assert len(_forked(tmp_path)) == n_before + 1, "the shim ran the real interpreter"
    assert real.returncode == ours.returncode == 7, ours.stderr
    r, o = json.loads(real.stdout), json.loads(ours.stdout)
    for key in ("argv", "file", "path0", "cwd", "env", "threads", "name", "nofile", "umask", "stdin", "ppid"):
        if key == "ppid":  # each has its own parent (the shim's is this process, as the real one's)
            assert r[key] == o[key] == os.getpid()
        else:
            assert r[key] == o[key], (key, r[key], o[key])
    assert o["executable"] == helpers.PYTHON  # processes it starts go through the server too
    assert r["seed"] != o["seed"]  # torch seeded from the OS in each, not inherited from the server


def test_exit_by_exception_and_by_signal_and_forwarded_signals(tmp_path):
    _wait_ready()
    r = subprocess.run([helpers.PYTHON, "-c", "raise ValueError('boom')"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("Traceback") and "ValueError: boom" in r.stderr
    assert "forkserver" not in r.stderr  # the server's own frames are not shown
    r = subprocess.run([helpers.PYTHON, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGTERM
    r = subprocess.run([helpers.PYTHON, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL and r.stderr == ""
    p = subprocess.Popen([helpers.PYTHON, "-u", "-c", "import signal, sys, time\n"
                          "signal.signal(signal.SIGTERM, lambda *a: (print('got TERM'), sys.exit(5)))\n"
                          "print('ready'); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 5 and p.stdout.read().strip() == "got TERM"


def test_a_killed_client_takes_its_child_along(tmp_path):
    _wait_ready()
    flag = tmp_path / "pid"
    p = subprocess.Popen([helpers.PYTHON, "-c", f"import os, time; open({str(flag)!r}, 'w').write(str(os.getpid()));"
                          " time.sleep(120)"])
    deadline = time.monotonic() + 60
    while not (flag.exists() and flag.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    child = int(flag.read_text())
    assert child != p.pid
    p.kill()
    p.wait()
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{child}") and open(f"/proc/{child}/stat").read().split()[2] != "Z":
        assert time.monotonic() < deadline, "the forked child outlived its killed client"
        time.sleep(0.1)


def test_what_it_cannot_run_faithfully_runs_in_the_real_interpreter(tmp_path):
    _wait_ready()
    log = os.path.join(os.path.dirname(helpers.PYTHON), "real.log")
    cases = [
        (["-X", "importtime", "-c", "pass"], {}, "interpreter options"),
        (["-c", "pass"], {"MALLOC_ARENA_MAX": "1"}, "start-only environment differs (MALLOC_ARENA_MAX)"),
        (["-c", "pass"], {"MEGATRON_EXT_TEST_FORKSERVER": "0"}, "MEGATRON_EXT_TEST_FORKSERVER=0"),
        None,  # another checkout first on PYTHONPATH (below)
    ]
    other = tmp_path / "other_checkout"
    (other / "megatron_ext").mkdir(parents=True)
    (other / "megatron_ext" / "__init__.py").write_text("")
    cases[-1] = (["-c", "pass"], {"PYTHONPATH": str(other)}, "megatron_ext would be imported from " + str(other))
    for args, extra, why in cases:
        before = open(log).read() if os.path.exists(log) else ""
        r = subprocess.run([helpers.PYTHON, *args], env=dict(os.environ, **extra), capture_output=True, text=True,
                           timeout=120, cwd=tmp_path)  # not the repo: '' (cwd) comes first for -c
        assert r.returncode == 0, r.stderr
        new = (open(log).read() if os.path.exists(log) else "")[len(before):]
        assert why in new, (args, extra, new)
