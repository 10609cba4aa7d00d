"""trainer.reuse_host_memory: glibc malloc keeps freed blocks, so a training step's large tensors stop faulting
in fresh pages. Checked by counting minor page faults (getrusage), not by timing."""
import subprocess
import sys

import pytest

from megatron_ext.training.host_memory import _glibc, resolve_reuse_host_memory

# A 64 MiB tensor is allocated, written and freed, then allocated and written again; prints the minor page faults
# of the second round. glibc's default serves it with a fresh mmap each time: one fault per 4 KiB page (16,384).
_PROBE = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from megatron_ext.training.host_memory import reuse_host_memory
    assert reuse_host_memory()
for _ in range(2):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 1024 * 1024, dtype=torch.float32).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    del t
print(faults)
"""


def _faults(mode, run_env):
    r = subprocess.run([sys.executable, "-c", _PROBE, mode], env=run_env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.split()[-1])


@pytest.mark.skipif(_glibc() is None, reason="mallopt tuning applies to glibc only")
def test_reuse_removes_page_faults_of_a_reallocated_tensor(run_env):
    default, reuse = _faults("default", run_env), _faults("reuse", run_env)
    assert default > 8000, default  # fresh mmap: ~16,384 faults (one per page)
    assert reuse < 500, reuse  # the freed block is reused, already mapped


def test_setting_resolution():
    assert resolve_reuse_host_memory(None, on_cuda=False) is True
    assert resolve_reuse_host_memory(None, on_cuda=True) is False
    assert resolve_reuse_host_memory(False, on_cuda=False) is False
    assert resolve_reuse_host_memory(True, on_cuda=True) is True
