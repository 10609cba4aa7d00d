"""Resume under another layout (checkpoint/reshard.py): a run trained 20 steps in layout A with a checkpoint at
step 10 is resumed at step 10 in layout B. The state B loaded is A's, bitwise (B writes what it loaded back out
and the gathered tensors are compared); B's train/loss equals A's at step 11 within 1e-5 relative, at step 12
(where lost Adam moments would show) within 1e-4 and up to step 20 within 1e-3; A -> B -> A gives back A's
tensors bitwise.

Layouts: 1 process, TP2, PP2, DP2 ZeRO-1, DP2 ZeRO-3, TP2 with ZeRO-2 and CPU offload of the optimizer: all 30
ordered pairs, each with its round trip. One launch of B (``reshard_hop.py --train``) both writes the state it
loaded and trains steps 11-20; the round trips back to A take one launch per layout A (``--many``: one engine
loads, in turn, every B checkpoint of that A). ``MEXT_RESHARD_MATRIX=cycle`` runs only a
cycle through the six layouts (each one A once and B once), for a quick look. Three more pairs go beyond the
matrix: TP2 x PP2 (4 processes) -> DP2 ZeRO-3, PP2 with ZeRO-1 -> 1 process, and bf16 DP2 ZeRO-1 -> bf16 TP2
ZeRO-2 (bf16 losses compared to bf16's precision).
"""
import json
import os
import shutil
import subprocess

import pytest
import torch

from helpers import REPO, launch_cmd, multiprocess_env

COMMON = ["+experiment=cpu_smoke", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
          "model.seq_length=32", "model.micro_batch_size=2", "model.global_batch_size=4", "trainer.max_steps=20",
          "trainer.val_check_interval=0", "trainer.log_every_n_steps=1", "exp_manager.create_tensorboard_logger=false",
          "exp_manager.checkpoint_callback_params.every_n_train_steps=10", "exp_manager.name=rs"]

LAYOUTS = {
    "one": (1, []),
    "tp2": (2, ["model.tensor_model_parallel_size=2"]),
    "pp2": (2, ["model.pipeline_model_parallel_size=2"]),
    "dp2z1": (2, ["model.zero_stage=1"]),
    "dp2z3": (2, ["model.zero_stage=3"]),
    "tp2z2off": (2, ["model.tensor_model_parallel_size=2", "model.zero_stage=2", "model.offload_optimizer=cpu"]),
}
NAMES = list(LAYOUTS)
# beyond the matrix: 4 processes (TP2 x PP2), the pipeline engine with ZeRO-1, bf16 with ZeRO (fp32 masters)
LAYOUTS.update({
    "tp2pp2": (4, ["model.tensor_model_parallel_size=2", "model.pipeline_model_parallel_size=2"]),
    "pp2z1": (2, ["model.pipeline_model_parallel_size=2", "model.zero_stage=1"]),
    "bf16dp2z1": (2, ["trainer.precision=bf16", "model.zero_stage=1"]),
    "bf16tp2z2": (2, ["trainer.precision=bf16", "model.tensor_model_parallel_size=2", "model.zero_stage=2"]),
})
EXTRA = [("tp2pp2", "dp2z3"), ("pp2z1", "one"), ("bf16dp2z1", "bf16tp2z2")]
CYCLE = [(a, NAMES[(i + 1) % len(NAMES)]) for i, a in enumerate(NAMES)]
MATRIX = [(a, b) for a in NAMES for b in NAMES if a != b]
PAIRS = (CYCLE if os.environ.get("MEXT_RESHARD_MATRIX") == "cycle" else MATRIX) + EXTRA
# train/loss, relative to A's: at step 11, step 12, steps 11-20. bf16 rounds the activations of another TP split
# differently, so its losses only agree to bf16's precision (the loaded state is still bitwise A's)
TOLERANCE = {"fp32": (1e-5, 1e-4, 1e-3), "bf16": (1e-3, 1e-3, 5e-3)}
STEP10 = os.path.join("checkpoints", "step_0000010")


def _run(env, world, script_and_args):
    p = subprocess.run(launch_cmd(world, script_and_args), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def _train(env, exp, version, layout, extra=()):
    world, over = LAYOUTS[layout]
    _run(env, world, ["pretrain_gpt.py", *COMMON, *over, f"trainer.devices={world}", f"exp_manager.exp_dir={exp}",
                      f"exp_manager.version={version}", *extra])
    return exp / "rs" / version


def _losses(run):
    return {r["step"]: r["train/loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "train/loss" in r}


def _at_step10(src_run, exp, version):
    """A new run directory whose only checkpoint is ``src_run``'s step 10."""
    dst = exp / "rs" / version / "checkpoints"
    dst.mkdir(parents=True)
    shutil.copytree(src_run / STEP10, dst / "step_0000010")
    (dst / "latest").write_text("step_0000010")
    return exp / "rs" / version


def _hop(env, src_run, exp, version, layout):
    """Resume ``src_run``'s step 10 under ``layout`` (as run ``version``_in), write the loaded state as run
    ``version``'s step 10, and train the resumed run on to step 20. Returns (version, version_in)."""
    run_in = _at_step10(src_run, exp, version + "_in")
    out = exp / "rs" / version / "checkpoints"
    world, over = LAYOUTS[layout]
    _run(env, world, ["tests/integration/reshard_hop.py", str(out), "--train", *COMMON, *over,
                      f"trainer.devices={world}", f"exp_manager.exp_dir={exp}", f"exp_manager.version={version}_in",
                      "exp_manager.resume_if_exists=true"])
    return exp / "rs" / version, run_in


def _state(run):
    from megatron_ext.checkpoint.reshard import read_tensors

    return read_tensors(str(run / STEP10))


def _assert_bitwise(got, want, what):
    assert sorted(got) == sorted(want), what
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return multiprocess_env(XDG_CACHE_HOME=str(tmp_path_factory.mktemp("xdg_reshard")))


@pytest.fixture(scope="module")
def a_runs(tmp_path_factory, env):
    """Each layout that is an A of the pairs, trained 20 steps (checkpoints at 10 and 20), once per module."""
    exp = tmp_path_factory.mktemp("reshard")
    return exp, {a: _train(env, exp, f"A_{a}", a) for a in dict.fromkeys(a for a, _ in PAIRS)}


@pytest.fixture(scope="module")
def hops(a_runs, env):
    """(a, b) -> (B's checkpoint of the state it loaded from A's step 10, B's run trained on to step 20); filled
    by the tests of the pairs, or by the round-trip test for the pairs it finds missing."""
    exp, runs = a_runs

    def hop(a, b):
        if (a, b) not in cache:
            cache[a, b] = _hop(env, runs[a], exp, f"B_{a}_{b}", b)
        return cache[a, b]

    cache = {}
    return hop


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}-to-{b}" for a, b in PAIRS])
def test_resume_in_other_layout(a_runs, hops, a, b):
    exp, runs = a_runs
    run_a = runs[a]
    state_a = _state(run_a)
    assert any(k.endswith("/exp_avg_sq") for k in state_a) and any(k.endswith("/step") for k in state_a)
    # the state B loads is A's, bitwise; B trains on from step 10 as A did
    hop, run_b = hops(a, b)
    _assert_bitwise(_state(hop), state_a, f"{a} -> {b}: state loaded in {b}")
    la, lb = _losses(run_a), _losses(run_b)
    assert sorted(lb) == list(range(11, 21))
    rel = {s: abs(lb[s] - la[s]) / abs(la[s]) for s in lb}
    t11, t12, tall = TOLERANCE["bf16" if a.startswith("bf16") else "fp32"]
    assert rel[11] <= t11 and rel[12] <= t12 and max(rel.values()) <= tall, rel


def test_round_trips_give_back_a_bitwise(a_runs, hops, env, tmp_path):
    """Every pair's B checkpoint back in A: one launch per layout A loads, in turn, the checkpoints all its B's
    wrote (``reshard_hop.py --many``) and writes each back; every one equals A's state bitwise."""
    exp, runs = a_runs
    for a in dict.fromkeys(a for a, _ in PAIRS):
        listing = tmp_path / f"back_{a}.txt"
        outs = {b: exp / "rs" / f"back_{a}_{b}" / "checkpoints" for x, b in PAIRS if x == a}
        listing.write_text("".join(f"{hops(a, b)[0] / 'checkpoints'} {out}\n" for b, out in outs.items()))
        world, over = LAYOUTS[a]
        _run(env, world, ["tests/integration/reshard_hop.py", "--many", str(listing), *COMMON, *over,
                          f"trainer.devices={world}", f"exp_manager.exp_dir={exp}", f"exp_manager.version=back_{a}"])
        state_a = _state(runs[a])
        for b in outs:
            _assert_bitwise(_state(exp / "rs" / f"back_{a}_{b}"), state_a, f"{a} -> {b} -> {a}")
