"""The step watchdog's and the straggler detection's pure parts: the test-only fault variable, the config keys, where a
thread waits (in a collective or not), the one line of a timeout, and the straggler verdict of a window."""
import json
import threading
import time

import pytest

from megatron_ext.config.loader import load_config, validate_config
from megatron_ext.errors import ConfigError
from megatron_ext.training import faults, stragglers, watchdog


# ------------------------------------------------------------------------------------------------ faults
def test_fault_variable_parses_kinds_ranks_steps_and_args():
    fs = faults.parse("sleep:rank=1:steps=3,5-7:seconds=2.5; sleep:rank=0:steps=1:fraction=0.3")
    assert [(f.kind, f.rank, sorted(f.steps), f.args) for f in fs] == [
        ("sleep", 1, [3, 5, 6, 7], {"seconds": 2.5, "fraction": None}),
        ("sleep", 0, [1], {"seconds": None, "fraction": 0.3})]
    assert faults.parse(None) == [] and faults.parse(" ") == []


@pytest.mark.parametrize("value,why", [
    ("boom:rank=1:steps=1:seconds=1", "unknown kind 'boom'"),
    ("sleep:rank=1:seconds=1", "'steps=' is missing"),
    ("sleep:rank=x:steps=1:seconds=1", "rank is not an integer"),
    ("sleep:rank=1:steps=0:seconds=1", "must be >= 1"),
    ("sleep:rank=1:steps=5-3:seconds=1", "A <= B"),
    ("sleep:rank=1:steps=a:seconds=1", "is not an integer or a range"),
    ("sleep:rank=1:steps=1", "exactly one of seconds=S, fraction=F"),
    ("sleep:rank=1:steps=1:seconds=1:fraction=0.3", "exactly one of seconds=S, fraction=F"),
    ("sleep:rank=1:steps=1:factor=2", "unknown argument(s) factor"),
    ("sleep:rank=1:steps=1:seconds=-1", "seconds must be >= 0"),
    ("sleep:rank=1:steps=1:seconds", "is not name=value"),
])
def test_bad_fault_variable_is_one_error_naming_it(value, why):
    with pytest.raises(ConfigError) as e:
        faults.parse(value)
    assert str(e.value).startswith(f"MEGATRON_EXT_FAULT_INJECT={value!r}: ") and why in str(e.value), str(e.value)


def test_active_reads_the_environment(monkeypatch):
    monkeypatch.setenv(faults.ENV, "sleep:rank=1:steps=2-3:seconds=0")
    assert faults.active("sleep", 1, 2) is not None and faults.active("sleep", 1, 4) is None
    assert faults.active("sleep", 0, 2) is None
    monkeypatch.setenv(faults.ENV, "sleep:rank=0:steps=4:seconds=0")
    assert faults.active("sleep", 0, 4) is not None and faults.active("sleep", 1, 2) is None


# ------------------------------------------------------------------------------------------------ config
def _cfg(*over):
    return load_config(overrides=list(over))


@pytest.mark.parametrize("over,key", [
    ("trainer.step_timeout_minutes=0", "trainer.step_timeout_minutes=0"),
    ("trainer.step_timeout_minutes=-1", "trainer.step_timeout_minutes=-1"),
    ("trainer.straggler_every_n_steps=-1", "trainer.straggler_every_n_steps=-1"),
    ("trainer.straggler_threshold=0", "trainer.straggler_threshold=0"),
])
def test_bad_watchdog_keys_are_errors_naming_them(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(_cfg(over), 1, False)


def test_straggler_interval_auto_and_refused_where_it_cannot_measure():
    assert stragglers.resolve_every(_cfg()) == stragglers.AUTO_EVERY
    assert stragglers.resolve_every(_cfg("trainer.straggler_every_n_steps=0")) == 0
    assert stragglers.resolve_every(_cfg("trainer.straggler_every_n_steps=7")) == 7
    pp = ("model.pipeline_model_parallel_size=2", "trainer.devices=2")
    assert stragglers.resolve_every(_cfg(*pp)) == 0  # null: off with the pipeline engine
    with pytest.raises(ConfigError, match="trainer.straggler_every_n_steps=5 cannot work with "
                                          "model.pipeline_model_parallel_size=2"):
        validate_config(_cfg(*pp, "trainer.straggler_every_n_steps=5"), 2, False)
    assert stragglers.resolve_every(_cfg("model.zero_stage=3")) == 0
    with pytest.raises(ConfigError, match="model.zero_stage=3"):
        validate_config(_cfg("model.zero_stage=3", "trainer.straggler_every_n_steps=5"), 1, False)


# ------------------------------------------------------------------------------------------------ watchdog
def _frame_of(thread):
    import sys

    for _ in range(200):
        f = sys._current_frames().get(thread.ident)
        if f is not None and f.f_code.co_name in ("all_reduce", "wait"):
            return f
        time.sleep(0.01)
    raise AssertionError("thread not in place")


def test_where_tells_a_collective_from_compute():
    """A thread blocked in a function of a torch/distributed file counts as in a collective, named by that function
    (not torch's logging wrapper around it) and its caller; a thread waiting elsewhere does not."""
    gate = threading.Event()
    ns = {}
    src = ("def wrapper(ev):\n    return all_reduce(ev)\n\n"
           "def all_reduce(ev):\n    ev.wait(10)\n")
    exec(compile(src, "/x/site-packages/torch/distributed/distributed_c10d.py", "exec"), ns)

    def in_collective():
        ns["wrapper"](gate)

    t1 = threading.Thread(target=in_collective)
    t2 = threading.Thread(target=gate.wait, args=(10,))
    t1.start()
    t2.start()
    try:
        w1 = watchdog.where(_frame_of(t1))
        w2 = watchdog.where(_frame_of(t2))
    finally:
        gate.set()
        t1.join()
        t2.join()
    assert w1["collective"] is True and w1["where"].startswith("all_reduce at torch/distributed/distributed_c10d.py:5")
    assert w2["collective"] is False and w2["where"].startswith("wait at "), w2


def test_timeout_line_names_collective_computing_and_silent_ranks():
    report = {"step": 7, "timeout_minutes": 0.5, "stacks_dir": "/run/stacks",
              "collective": {"0": "all_reduce at a.py:1", "2": "all_reduce at a.py:1"},
              "not_collective": {"1": "sleep at b.py:2"}, "silent": [3]}
    line = watchdog.compose_line(report)
    assert line == ("error: step 7 exceeded trainer.step_timeout_minutes=0.5 (30 s); waiting in a collective: rank 0 "
                    "(all_reduce at a.py:1), rank 2 (all_reduce at a.py:1); not in a collective: rank 1 (sleep at "
                    "b.py:2); not responding: rank 3 (no stack dump within 10s: stopped, dead, or stuck in native "
                    "code holding the GIL); stacks in /run/stacks")
    assert "not responding: rank 3 (stopped)" in watchdog.compose_line(report, {3: "stopped"})


def test_a_stack_file_counts_once_complete(tmp_path):
    p = tmp_path / "rank0.txt"
    p.write_text(watchdog._HEADER + json.dumps({"rank": 0, "collective": True, "where": "x"}) + "\nstack\n")
    assert watchdog.read_header(str(p)) is None  # not finished
    p.write_text(p.read_text() + watchdog._END)
    assert watchdog.read_header(str(p))["rank"] == 0
    p.write_text("Thread 0x1 (most recent call first):\n" + watchdog._END)  # a signal-only dump
    assert watchdog.read_header(str(p)) is None
    p.write_text("Thread 0x1 (most recent call first):\n" + watchdog._HEADER + '{"rank": 1}\n' + watchdog._END)
    assert watchdog.read_header(str(p)) == {"rank": 1}  # a launcher-asked dump, then the rank's own


def test_earlier_dumps_are_moved_not_overwritten(tmp_path):
    old = tmp_path / "stacks"
    old.mkdir()
    (old / "rank0.txt").write_text("old")
    assert watchdog.prepare_dir(str(tmp_path), 0) == str(old)
    assert (tmp_path / "stacks.1" / "rank0.txt").read_text() == "old" and not old.exists()
    assert watchdog.prepare_dir(str(tmp_path), 1) == str(old)  # only rank 0 moves


# ------------------------------------------------------------------------------------------------ stragglers
def test_straggler_verdict():
    clean = [[1.0, 1.1, 0.9, 1.0], [1.05, 1.0, 1.0, 1.1]]
    v = stragglers._window_verdict(clean, 0.2)
    assert v["straggler"] is None and v["min"] == pytest.approx(1.0) and v["max"] == pytest.approx(1.0375)
    slow = [[1.0, 1.0, 1.0, 1.0], [1.3, 2.0, 1.0, 1.31]]  # one fast step of four does not clear it
    v = stragglers._window_verdict(slow, 0.2)
    assert v["slowest"] == 1 and v["straggler"]["rank"] == 1 and v["straggler"]["ratio"] == pytest.approx(1.305)
    spike = [[1.0, 1.0, 1.0, 1.0], [1.0, 3.0, 1.0, 1.0]]  # one slow step is not a straggler
    assert stragglers._window_verdict(spike, 0.2)["straggler"] is None
    three = [[1.0] * 4, [1.0] * 4, [1.5] * 4]
    assert stragglers._window_verdict(three, 0.2)["straggler"]["rank"] == 2
    assert stragglers._window_verdict([[1.0, 2.0]], 0.2)["straggler"] is None  # one rank


class _Clock:
    """A clock the test moves by hand (``stragglers.time``)."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_monitor_measures_compute_without_waits_and_injected_sleep(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(stragglers, "time", clock)
    m = stragglers.StragglerMonitor(every=2, threshold=0.2, rank=0, world=1, device="cpu")
    m.step_begin(1)
    clock.now += 0.005
    token = m.wait_begin()
    clock.now += 0.015  # the token-count all-reduce: waiting
    m.wait_end(token)
    clock.now += 0.010
    m.compute_done()  # the backward epilogue: the gradient reduction starts
    clock.now += 0.500  # reduction, optimizer step, logging: not compute
    assert m.step_end(1) is None
    assert m.times == [pytest.approx(0.015)] and m.last_compute == pytest.approx(0.015)
    m.step_begin(2)
    m.injected = 0.004  # faults.inject_sleep
    clock.now += 0.020  # no compute_done (no gradient reduction seen): up to the end of the step
    out = m.step_end(2)  # a gather step (world of one: no collective)
    assert m.last_compute == pytest.approx(0.016) and m.times == []
    assert out == {"step_time_min": pytest.approx(0.0175), "step_time_max": pytest.approx(0.0175),
                   "step_time_slowest_rank": 0.0}


def test_a_resumed_process_lets_the_requested_dump_finish_first(tmp_path, monkeypatch):
    # a stopped worker that the launcher continues (after asking for its stacks) sees one late poll: its own dump
    # waits RESUMED_WAIT_S once for that step (so the two dumps do not interleave in its file), then fires
    from megatron_ext.training import watchdog as W

    clock = [1000.0]
    events = []

    class Stop:
        def __init__(self, deltas):
            self.deltas = list(deltas)

        def wait(self, timeout):
            clock[0] += self.deltas.pop(0) if self.deltas else timeout
            return False

    class Exit(Exception):
        pass

    def fake_exit(code):
        events.append(("exit", code))
        raise Exit

    monkeypatch.setattr(W.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(W.time, "sleep", lambda s: events.append(("sleep", s)))
    monkeypatch.setattr(W.os, "_exit", fake_exit)
    for waited_before, expect in ((None, [("sleep", W.RESUMED_WAIT_S), "fire", ("exit", W.EXIT_STEP_TIMEOUT)]),
                                  (7, ["fire", ("exit", W.EXIT_STEP_TIMEOUT)])):
        events.clear()
        wd = W.StepWatchdog(0.001, 0, 1, str(tmp_path), poll_s=0.01)
        wd._fire = lambda elapsed: events.append("fire")
        wd._stop = Stop([10.0])  # the first poll comes 10 s late: the process was stopped
        wd._step, wd._t0, wd._waited_step = 7, clock[0] - 100.0, waited_before
        with pytest.raises(Exit):
            wd._run()
        assert events == expect, events
