"""Device-agnostic RNG state tracker (megatron-core's ``fork()`` contract, CPU and CUDA).

megatron-core's ``get_cuda_rng_tracker`` / ``model_parallel_cuda_manual_seed`` only track the
CUDA generator, so dropout on CPU would not be separated by tensor-parallel rank and activation
recompute could not replay it. This tracker keeps, per named stream, the state of the CPU
generator and (when CUDA is in use) of the current CUDA device's generator, and ``fork(name)``
swaps them in and out of the global generators::

    tracker = get_rng_tracker()
    with tracker.fork():            # the tensor-model-parallel stream
        probs = F.dropout(probs, p)  # differs across TP ranks, same across DP replicas

Seeding follows Megatron-LM (``_set_random_seed`` + ``model_parallel_cuda_manual_seed``):

* default generators (python ``random``, numpy, torch CPU, torch CUDA) and the
  ``"data-parallel-rng"`` stream: ``seed + 100 * pp_rank`` -- identical across the TP ranks
  of a pipeline stage, so dropout *outside* tensor-parallel regions (on replicated
  activations) draws the same mask on every TP rank;
* ``"model-parallel-rng"`` stream: ``seed + 100 * pp_rank + 2718 + tp_rank`` -- different on
  every TP rank, used for dropout *inside* tensor-parallel regions (e.g. attention
  probabilities of the local heads).

``get_all_rng_states`` / ``set_all_rng_states`` capture and restore every generator (python,
numpy, torch CPU, torch CUDA, tracker) for exact resume. The captured object holds only
tensors and plain python values, so it round-trips through ``torch.save`` / ``torch.load``
(``weights_only=True`` included).
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Dict, Iterator, List, Optional

import numpy as np
import torch

DATA_PARALLEL_RNG_TRACKER_NAME = "data-parallel-rng"
MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
_DEFAULT_NAME = "default-rng"  # the global generators when no fork is active


def _cuda_in_use() -> bool:
    """True when CUDA is available *and* initialised (nothing can have drawn from a CUDA
    generator before initialisation, so there is no CUDA state worth swapping)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _seeded_cpu_state(seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g.get_state()


def _seeded_cuda_state(seed: int) -> torch.Tensor:
    g = torch.Generator(device=torch.device("cuda", torch.cuda.current_device()))
    g.manual_seed(int(seed))
    return g.get_state()


class RNGStatesTracker:
    """Named RNG streams swapped into the global CPU (and CUDA) generators by ``fork``.

    Same contract as megatron-core's ``CudaRNGStatesTracker``: ``add(name, seed)`` registers a
    stream (a seed or name may be used once), ``fork(name)`` runs a block with that stream and
    advances it, ``get_states()`` / ``set_states()`` snapshot and restore all streams,
    ``reset()`` forgets them. Forks may be nested (same or different names).
    """

    def __init__(self) -> None:
        self.reset()

    # -- bookkeeping -------------------------------------------------------------------
    def reset(self) -> None:
        self._seeds: Dict[str, int] = {}
        # name -> {"cpu": ByteTensor, "cuda": ByteTensor | None}
        self._states: Dict[str, Dict[str, Optional[torch.Tensor]]] = {}
        self._current = _DEFAULT_NAME

    def is_initialized(self) -> bool:
        return bool(self._states)

    def names(self) -> List[str]:
        return list(self._states)

    def add(self, name: str, seed: int) -> None:
        seed = int(seed)
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} is already tracked")
        if seed in self._seeds.values():
            raise ValueError(f"seed {seed} is already used by another RNG stream")
        self._seeds[name] = seed
        self._states[name] = {
            "cpu": _seeded_cpu_state(seed),
            "cuda": _seeded_cuda_state(seed) if _cuda_in_use() else None,
        }

    def get_states(self) -> Dict[str, Any]:
        """A snapshot of every stream (safe to keep: state tensors are never mutated)."""
        return {
            "seeds": dict(self._seeds),
            "states": {name: dict(st) for name, st in self._states.items()},
        }

    def set_states(self, states: Dict[str, Any]) -> None:
        """Restore a snapshot from ``get_states`` (replaces all streams)."""
        if not isinstance(states, dict) or "states" not in states:
            raise ValueError("set_states expects the dict returned by RNGStatesTracker.get_states()")
        self._seeds = dict(states.get("seeds", {}))
        self._states = {}
        for name, st in states["states"].items():
            self._states[name] = {"cpu": st["cpu"], "cuda": st.get("cuda")}

    # -- forking -----------------------------------------------------------------------
    def _cuda_state_for(self, name: str) -> torch.Tensor:
        st = self._states[name]
        if st.get("cuda") is None:  # CUDA was initialised after add(): seed the stream lazily
            st["cuda"] = _seeded_cuda_state(self._seeds.get(name, 0))
        return st["cuda"]

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Run the block with stream ``name`` in the global generators, then put back the
        generators' previous states; the stream keeps its advanced state for next time."""
        if name not in self._states:
            raise KeyError(
                f"RNG stream {name!r} is not tracked; call model_parallel_manual_seed(seed) "
                f"(or get_rng_tracker().add(name, seed)) first"
            )
        cuda = _cuda_in_use()
        orig_cpu = torch.get_rng_state()
        orig_cuda = torch.cuda.get_rng_state() if cuda else None
        orig_name = self._current
        if orig_name != _DEFAULT_NAME:
            # Inside another fork: that stream's progress so far belongs to it.
            self._states[orig_name]["cpu"] = orig_cpu
            if cuda:
                self._states[orig_name]["cuda"] = orig_cuda
        torch.set_rng_state(self._states[name]["cpu"])
        if cuda:
            torch.cuda.set_rng_state(self._cuda_state_for(name))
        self._current = name
        try:
            yield
        finally:
            self._states[name]["cpu"] = torch.get_rng_state()
            if cuda:
                self._states[name]["cuda"] = torch.cuda.get_rng_state()
            if orig_name != _DEFAULT_NAME:
                orig_cpu = self._states[orig_name]["cpu"]
                if cuda:
                    orig_cuda = self._states[orig_name]["cuda"]
            torch.set_rng_state(orig_cpu)
            if cuda and orig_cuda is not None:
                torch.cuda.set_rng_state(orig_cuda)
            self._current = orig_name


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker used by the modules for dropout."""
    return _TRACKER


def _parallel_ranks(tp_rank: Optional[int], pp_rank: Optional[int]) -> tuple[int, int]:
    if tp_rank is not None and pp_rank is not None:
        return int(tp_rank), int(pp_rank)
    try:
        from megatron.core import parallel_state as ps

        initialized = ps.model_parallel_is_initialized()
    except Exception:  # pragma: no cover - megatron-core is a hard dependency
        initialized = False
    if initialized:
        tp = ps.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
        pp = ps.get_pipeline_model_parallel_rank() if pp_rank is None else pp_rank
    else:
        tp = 0 if tp_rank is None else tp_rank
        pp = 0 if pp_rank is None else pp_rank
    return int(tp), int(pp)


def model_parallel_manual_seed(
    seed: int,
    *,
    tp_rank: Optional[int] = None,
    pp_rank: Optional[int] = None,
    seed_global: bool = True,
) -> Dict[str, int]:
    """Seed everything the Megatron way (see the module docstring) and (re)build the tracker.

    ``tp_rank`` / ``pp_rank`` default to megatron-core's parallel_state (0 when it is not
    initialised). With ``seed_global`` the python, numpy, torch CPU and CUDA default
    generators are seeded too. Returns the seeds used, by stream name.
    """
    tp, pp = _parallel_ranks(tp_rank, pp_rank)
    base = int(seed) + 100 * pp
    tp_seed = base + 2718 + tp
    if seed_global:
        random.seed(base)
        np.random.seed(base % (2**32))
        torch.manual_seed(base)  # also seeds every CUDA device
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(DATA_PARALLEL_RNG_TRACKER_NAME, base)
    tracker.add(MODEL_PARALLEL_RNG_TRACKER_NAME, tp_seed)
    return {_DEFAULT_NAME: base, DATA_PARALLEL_RNG_TRACKER_NAME: base, MODEL_PARALLEL_RNG_TRACKER_NAME: tp_seed}


def _numpy_state_to_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def _numpy_state_from_plain(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy()
    return (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))


def get_all_rng_states() -> Dict[str, Any]:
    """Every RNG state this process uses: python, numpy, torch CPU, torch CUDA (all devices,
    when CUDA is initialised) and the tracker's streams."""
    return {
        "python": random.getstate(),
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if _cuda_in_use() else None,
        "tracker": get_rng_tracker().get_states(),
    }


def set_all_rng_states(states: Dict[str, Any]) -> None:
    """Restore what ``get_all_rng_states`` captured. CUDA states are restored only when CUDA
    is available (a CPU resume of a GPU run keeps its CPU streams exact)."""
    required = ("python", "numpy", "torch_cpu", "tracker")
    missing = [k for k in required if k not in states]
    if missing:
        raise ValueError(f"RNG state is missing {missing}; expected the dict from get_all_rng_states()")
    py = states["python"]
    if isinstance(py, list):  # tuples may come back as lists from some serialisers
        py = (py[0], tuple(py[1]), py[2])
    random.setstate(py)
    np.random.set_state(_numpy_state_from_plain(tuple(states["numpy"])))
    torch.set_rng_state(states["torch_cpu"])
    cuda_states = states.get("torch_cuda")
    if cuda_states is not None and torch.cuda.is_available():
        n = min(len(cuda_states), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda_states[i], device=i)
    get_rng_tracker().set_states(states["tracker"])


__all__ = [
    "RNGStatesTracker",
    "get_rng_tracker",
    "model_parallel_manual_seed",
    "get_all_rng_states",
    "set_all_rng_states",
    "DATA_PARALLEL_RNG_TRACKER_NAME",
    "MODEL_PARALLEL_RNG_TRACKER_NAME",
]
