"""trainer.reuse_host_memory: glibc malloc keeps freed blocks, so a training step's large tensors stop faulting
in fresh pages. Checked by counting minor page faults (getrusage), not by timing."""
import subprocess
import sys

import pytest

from megatron_ext.training.host_memory import _glibc, resolve_reuse_host_memory

# A small training loop (a 512 x 32768 logits layer: 64 MiB activations and gradients, plus an MLP and the CE's
# temporaries) run 30 times; prints the average minor page faults of the last 10 iterations (steady state).
# glibc's default serves every large tensor with a fresh mmap: one fault per 4 KiB page written, ~80k per iteration.
_PROBE = """
import resource, sys, torch
if sys.argv[1] == "reuse":
    from megatron_ext.training.host_memory import reuse_host_memory
    assert reuse_host_memory()
torch.manual_seed(0)
w1 = torch.randn(64, 256, requires_grad=True)
w2 = torch.randn(256, 32768, requires_grad=True)
x = torch.randn(512, 64)
faults = []
for _ in range(30):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    logits = torch.nn.functional.gelu(x @ w1) @ w2
    torch.nn.functional.cross_entropy(logits, torch.zeros(512, dtype=torch.long)).backward()
    w1.grad = w2.grad = None
    del logits
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sum(faults[-10:]) // 10)
"""


def _faults(mode, run_env):
    r = subprocess.run([sys.executable, "-c", _PROBE, mode], env=run_env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return int(r.stdout.split()[-1])


@pytest.mark.skipif(_glibc() is None, reason="mallopt tuning applies to glibc only")
def test_reuse_removes_page_faults_of_a_training_loop(run_env):
    default, reuse = _faults("default", run_env), _faults("reuse", run_env)
    assert default > 40000, default  # fresh mmaps: ~80k faults per iteration
    assert reuse < default / 10, (reuse, default)  # freed blocks are reused, already mapped (0 in most iterations)


def test_setting_resolution():
    assert resolve_reuse_host_memory(None, on_cuda=False) is True
    assert resolve_reuse_host_memory(None, on_cuda=True) is False
    assert resolve_reuse_host_memory(False, on_cuda=False) is False
    assert resolve_reuse_host_memory(True, on_cuda=True) is True
