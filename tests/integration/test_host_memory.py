"""trainer.reuse_host_memory: glibc malloc keeps freed blocks, so a training step's large tensors stop faulting
in fresh pages. Checked by counting minor page faults (getrusage), not by timing."""
import subprocess
import sys

import pytest

from megatron_ext.training.host_memory import _glibc, resolve_reuse_host_memory

# Our setting's effect, in a fresh process: with reuse_host_memory() applied, a step's large tensors (64 MiB and
# 16 MiB, 20480 pages of 4 KiB), allocated, written and freed again and again, come from malloc's heap, already
# mapped, once the heap has settled (PyTorch's aligned allocations leave holes in the first steps, see
# megatron_ext/training/host_memory.py), so the writes of the last iterations fault in (almost) no page.
# Prints the average count of the last 8 of 24 iterations.
_PAGES = (64 + 16) * 1024 * 1024 // 4096
_PROBE = """
import resource, torch
from megatron_ext.training.host_memory import reuse_host_memory
assert reuse_host_memory()
faults = []
for _ in range(24):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(16 * 1024 * 1024)  # 64 MiB of fp32
    a.fill_(1.0)
    b = torch.empty(4 * 1024 * 1024)
    b.fill_(2.0)
    del a, b
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sum(faults[-8:]) // 8)
"""


@pytest.mark.skipif(_glibc() is None, reason="mallopt tuning applies to glibc only")
def test_reuse_removes_page_faults_of_a_training_loop(run_env):
    r = subprocess.run([sys.executable, "-c", _PROBE], env=run_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    reuse = int(r.stdout.split()[-1])
    assert reuse < _PAGES // 10, (reuse, _PAGES)  # freed blocks are reused, already mapped


def test_setting_resolution():
    assert resolve_reuse_host_memory(None, on_cuda=False) is True
    assert resolve_reuse_host_memory(None, on_cuda=True) is False
    assert resolve_reuse_host_memory(False, on_cuda=False) is False
    assert resolve_reuse_host_memory(True, on_cuda=True) is True


# plan_check's measurement mode, in a fresh process: under reuse_host_memory() a freed 64 MiB tensor stays
# resident (the heap keeps it); under exact_host_memory() it is handed back at once, so the resident set follows
# the bytes allocated; restore_host_memory() puts the reuse setting back (the freed block stays resident again).
_EXACT = """
import torch
from megatron_ext.training import host_memory as hm
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
def freed_stays():
    a = torch.empty(16 * 1024 * 1024); a.fill_(1.0); b = torch.empty(1024); b.fill_(1.0)  # b pins the heap's top
    before = rss(); del a
    return before - rss() < (32 << 20)
assert hm.reuse_host_memory()
r1 = freed_stays()
assert hm.exact_host_memory() and hm._mode == "exact"
r2 = freed_stays()
hm.restore_host_memory()
r3 = freed_stays()
print(r1, r2, r3, hm._mode)
"""


@pytest.mark.skipif(_glibc() is None, reason="mallopt tuning applies to glibc only")
def test_exact_host_memory_hands_freed_blocks_back_and_restores_reuse(run_env):
    r = subprocess.run([sys.executable, "-c", _EXACT], env=run_env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-4:] == ["True", "False", "True", "reuse"], r.stdout
