"""RNG tracker: fork contract, seeding convention, state capture/restore."""
import io
import random

import numpy as np
import pytest
import torch

from megatron_ext.parallel.random import (
    DATA_PARALLEL_RNG_TRACKER_NAME,
    MODEL_PARALLEL_RNG_TRACKER_NAME,
    RNGStatesTracker,
    get_all_rng_states,
    get_rng_tracker,
    model_parallel_manual_seed,
    set_all_rng_states,
)


def _draws(seed, n=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g)


def test_fork_uses_stream_and_leaves_default_untouched():
    tr = RNGStatesTracker()
    tr.add("a", 11)
    torch.manual_seed(0)
    expected_default = torch.rand(3)
    torch.manual_seed(0)
    with tr.fork("a"):
        inside = torch.rand(5)
    after = torch.rand(3)
    assert torch.equal(inside, _draws(11))
    assert torch.equal(after, expected_default)  # default stream did not advance


def test_fork_advances_its_stream():
    tr = RNGStatesTracker()
    tr.add("a", 5)
    with tr.fork("a"):
        first = torch.rand(3)
    torch.rand(7)  # default stream activity in between does not matter
    with tr.fork("a"):
        second = torch.rand(2)
    assert torch.equal(torch.cat([first, second]), _draws(5))


def test_nested_forks_same_and_different_names():
    tr = RNGStatesTracker()
    tr.add("a", 1)
    tr.add("b", 2)
    with tr.fork("a"):
        a1 = torch.rand(2)
        with tr.fork("b"):
            b1 = torch.rand(2)
        a2 = torch.rand(1)
        with tr.fork("a"):  # same name nested: continues the same stream
            a3 = torch.rand(2)
        a4 = torch.rand(1)
    with tr.fork("b"):
        b2 = torch.rand(1)
    assert torch.equal(torch.cat([a1, a2, a3, a4]), _draws(1, 6))
    assert torch.equal(torch.cat([b1, b2]), _draws(2, 3))


def test_fork_restores_on_exception():
    tr = RNGStatesTracker()
    tr.add("a", 3)
    torch.manual_seed(42)
    ref = torch.rand(2)
    torch.manual_seed(42)
    with pytest.raises(RuntimeError):
        with tr.fork("a"):
            torch.rand(4)
            raise RuntimeError("boom")
    assert torch.equal(torch.rand(2), ref)
    with tr.fork("a"):  # the stream kept its progress (4 draws)
        nxt = torch.rand(1)
    assert torch.equal(nxt, _draws(3, 5)[4:])


def test_add_and_fork_errors():
    tr = RNGStatesTracker()
    tr.add("a", 1)
    with pytest.raises(ValueError, match="already tracked"):
        tr.add("a", 2)
    with pytest.raises(ValueError, match="seed 1"):
        tr.add("b", 1)
    with pytest.raises(KeyError, match="not tracked"):
        with tr.fork("missing"):
            pass


def test_get_set_states_and_reset():
    tr = RNGStatesTracker()
    tr.add("a", 9)
    snap = tr.get_states()
    with tr.fork("a"):
        x = torch.rand(4)
    tr.set_states(snap)
    with tr.fork("a"):
        y = torch.rand(4)
    assert torch.equal(x, y)
    tr.reset()
    assert not tr.is_initialized() and tr.names() == []
    with pytest.raises(ValueError):
        tr.set_states({"nope": 1})


def test_model_parallel_manual_seed_convention():
    seeds = model_parallel_manual_seed(100, tp_rank=1, pp_rank=2)
    assert seeds[DATA_PARALLEL_RNG_TRACKER_NAME] == 300
    assert seeds[MODEL_PARALLEL_RNG_TRACKER_NAME] == 300 + 2718 + 1
    default_r1 = torch.rand(4)
    with get_rng_tracker().fork():
        tp_r1 = torch.rand(4)

    model_parallel_manual_seed(100, tp_rank=0, pp_rank=2)
    default_r0 = torch.rand(4)
    with get_rng_tracker().fork():
        tp_r0 = torch.rand(4)

    # Default generator: same on every TP rank of a stage; TP stream: differs per TP rank.
    assert torch.equal(default_r0, default_r1)
    assert not torch.equal(tp_r0, tp_r1)
    assert torch.equal(tp_r0, _draws(300 + 2718, 4))
    # Other pipeline stage -> other default stream.
    model_parallel_manual_seed(100, tp_rank=0, pp_rank=0)
    assert not torch.equal(torch.rand(4), default_r0)


def test_model_parallel_manual_seed_seeds_python_and_numpy():
    model_parallel_manual_seed(7, tp_rank=0, pp_rank=0)
    a = (random.random(), float(np.random.rand()), torch.rand(1).item())
    model_parallel_manual_seed(7, tp_rank=0, pp_rank=0)
    b = (random.random(), float(np.random.rand()), torch.rand(1).item())
    assert a == b


def test_all_rng_states_roundtrip_through_torch_save():
    model_parallel_manual_seed(1234, tp_rank=0, pp_rank=0)
    random.random(), np.random.rand(3), torch.rand(3)
    with get_rng_tracker().fork():
        torch.rand(3)
    states = get_all_rng_states()
    buf = io.BytesIO()
    torch.save(states, buf)

    def sample():
        with get_rng_tracker().fork():
            t = torch.rand(3)
        return (random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist(), t.tolist(), torch.randn(1).item())

    expected = sample()
    # Scramble everything, then restore from the serialised copy (weights_only loader).
    model_parallel_manual_seed(999, tp_rank=0, pp_rank=0)
    sample()
    buf.seek(0)
    set_all_rng_states(torch.load(buf, weights_only=True))
    assert sample() == expected


def test_set_all_rng_states_rejects_garbage():
    with pytest.raises(ValueError, match="missing"):
        set_all_rng_states({"python": random.getstate()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fork_swaps_cuda_state():
    torch.cuda.init()
    tr = RNGStatesTracker()
    tr.add("a", 21)
    torch.cuda.manual_seed(0)
    ref = torch.rand(3, device="cuda")
    torch.cuda.manual_seed(0)
    with tr.fork("a"):
        inside = torch.rand(4, device="cuda")
    assert torch.equal(torch.rand(3, device="cuda"), ref)
    g = torch.Generator(device="cuda").manual_seed(21)
    assert torch.equal(inside, torch.rand(4, device="cuda", generator=g))
