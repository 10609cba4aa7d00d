"""megatron_ext/planning: the peak-memory reader (measure.PeakMemory) and check.compare; trainer.plan_check_steps
validation."""
import pytest
import torch

from megatron_ext.planning.check import compare
from megatron_ext.planning.measure import PeakMemory


def test_host_peak_sees_a_freed_allocation():
    from megatron_ext.training.host_memory import exact_host_memory, restore_host_memory

    # as plan_check measures: exact malloc, so the allocation is fresh memory even in a worker whose heap already
    # holds freed, resident blocks (an earlier in-process run under trainer.reuse_host_memory)
    exact = exact_host_memory()
    try:
        pm = PeakMemory().start()
        assert pm.reset  # Linux: VmHWM resettable through /proc/self/clear_refs
        x = torch.ones(64 << 18)  # 64 MiB of fp32, written
        del x
        peak = pm.peak_bytes()
        if exact:  # glibc: the block was its own mapping
            assert peak >= 60 << 20  # freed, but the high-water mark keeps it
            pm.start()  # a new baseline resets the mark
            assert pm.peak_bytes() < peak - (32 << 20)
    finally:
        restore_host_memory()


def test_compare_rows_and_warnings():
    M = 1 << 20
    out = compare({"peak_bytes": 110, "comm_bytes": {"dp_allreduce": 100 * M, "tp_allreduce": 5 * M,
                                                     "dp_broadcast": 800}},
                  {"peak_bytes": 100, "comm_bytes": {"dp_allreduce": 130 * M}})
    rows = {r["what"]: r for r in out["rows"]}
    assert rows["peak_bytes"]["ok"] and rows["peak_bytes"]["ratio"] == pytest.approx(1.1)
    assert not rows["comm_bytes_dp_allreduce"]["ok"]  # 100 / 130 is 23% off
    assert rows["comm_bytes_tp_allreduce"]["ratio"] is None and not rows["comm_bytes_tp_allreduce"]["ok"]
    # an unpredicted kind of a few hundred bytes (DeepSpeed's scalars) agrees: under SMALL_COMM_BYTES
    assert rows["comm_bytes_dp_broadcast"]["ratio"] is None and rows["comm_bytes_dp_broadcast"]["ok"]
    assert len(out["warnings"]) == 2 and "comm_bytes_dp_allreduce" in out["warnings"][0]


def test_live_tensor_bytes_counts_resident_pages_once():
    import ctypes
    import mmap

    from megatron_ext.planning.measure import _resident_bytes, live_tensor_bytes

    # resident pages of fresh anonymous memory: none until written, then what was written
    region = mmap.mmap(-1, 64 << 20)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert _resident_bytes(addr, 64 << 20) == 0
    region[: 8 << 20] = b"x" * (8 << 20)
    assert _resident_bytes(addr, 64 << 20) == 8 << 20
    del addr
    region.close()
    # a tensor and a view of it are one storage, counted once, by its resident pages (a reused heap block may
    # already be resident: the expectation is read from the storage itself)
    base = live_tensor_bytes()
    big = torch.empty(64 << 20, dtype=torch.uint8)
    view = big[: 8 << 20]
    view.fill_(1)
    st = big.untyped_storage()
    assert live_tensor_bytes() - base == _resident_bytes(st.data_ptr(), st.nbytes()) >= 8 << 20
    del big, view, st


def test_plan_check_steps_must_be_positive():
    from megatron_ext.config.loader import load_config, validate_config
    from megatron_ext.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trainer\.plan_check_steps=0: expected an integer >= 1"):
        validate_config(load_config(overrides=["trainer.plan_check_steps=0"]), 1, False)
