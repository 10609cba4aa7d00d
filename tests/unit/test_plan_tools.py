"""tools/plan.py's --compare (DeepSpeed's estimator, Megatron-LM's formulas), --measure-peak, the offload time in the
planner's step time, and trainer.plan_check's start-up prediction (PlanCheck.announce)."""
import math

import pytest
import torch

from helpers import compose_entry_config
from megatron_ext.cli.plan import main as plan_main
from megatron_ext.config.loader import check_config
from megatron_ext.config.schema import GPTConfig
from megatron_ext.models.families import family_of_config
from megatron_ext.parallel.state import initialize_parallel
from megatron_ext.planning.check import PlanCheck
from megatron_ext.planning.compare import compare, largest_layer_params
from megatron_ext.planning.peak import measure_peak_tflops
from megatron_ext.planning.planner import Machine, plan, predicted_for_check, search

GPU4 = Machine(devices_per_node=4, device_memory_gb=80)


@pytest.fixture(autouse=True, scope="module")
def _tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    yield


def _gpt(*overrides):
    return check_config(compose_entry_config(list(overrides)), GPTConfig)


def test_deepspeed_column_is_what_deepspeed_returns():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    ov = ["model.normalization=rmsnorm", "model.activation=swiglu", "model.position_embedding_type=rope",
          "model.share_embeddings_and_output_weights=false", "model.bias=false", "model.num_query_groups=2",
          "model.micro_batch_size=2", "model.global_batch_size=8"]
    cfg = _gpt(*ov)
    fam = family_of_config(cfg.model)
    model = fam.build(cfg.model, fam.build_tokenizer(cfg.model.tokenizer).vocab_size, init_seed=1)
    total, largest = model_to_params(model)  # DeepSpeed's own count of the built model (TP 1)
    for zero, off in ((1, False), (2, False), (2, True)):
        c = _gpt(*ov, f"model.zero_stage={zero}", f"model.offload_optimizer={'cpu' if off else 'null'}")
        got = compare(plan(c, GPU4), c, GPU4)
        assert got["params_per_rank"] == total
        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params=total, num_gpus_per_node=4, num_nodes=1,
                                                         cpu_offload=off)
        assert got["rows"]["total per device"]["deepspeed"] == gpu
        assert got["rows"]["host memory"]["deepspeed"] == cpu
        assert "per GPU" in got["deepspeed_printout"]
    c = _gpt(*ov, "model.zero_stage=3")
    pl = plan(c, GPU4)
    assert largest_layer_params(c, 1, pl.params["padded_vocab_size"]) == largest
    got = compare(pl, c, GPU4)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total_params=total, largest_layer_params=largest,
                                                        num_gpus_per_node=4, num_nodes=1, cpu_offload=False,
                                                        cpu_offload_params=False, zero_init=False)
    assert got["rows"]["total per device"]["deepspeed"] == gpu and got["rows"]["host memory"]["deepspeed"] == cpu
    assert got["rows"]["activations"]["deepspeed"] is None  # model states only
    # ZeRO 0: DeepSpeed has no estimator
    assert compare(plan(_gpt(*ov), GPU4), _gpt(*ov), GPU4)["rows"]["total per device"]["deepspeed"] is None


def test_megatron_column_is_megatrons_formula():
    # LayerNorm + GELU, tied embeddings, ffn 4h, TP 2 on 4 devices (DP 2), distributed optimizer (ZeRO 1)
    cfg = _gpt("model.tensor_model_parallel_size=2", "model.zero_stage=1", "model.micro_batch_size=2",
               "model.global_batch_size=8")
    m = cfg.model
    pl = plan(cfg, GPU4)
    h, L, s, V, t, dp, b = m.hidden_size, m.num_layers, m.seq_length, pl.params["padded_vocab_size"], 2, 2, 2
    f = 4 * h
    # per layer: q, k, v, o (4 h^2), fc1 + fc2 (2 h f), two LayerNorms of weight + bias (4 h); final LayerNorm 2h
    shard = ((L * (4 * h * h + 2 * h * f + 4 * h) + 2 * h) + V * h) / t
    act = (s * b * h * (10 + 24 / t) * L + 8 * s * b + s * b * h + 2 * (s * b * V / t + s * b * h)) * 1.05
    got = compare(pl, cfg, GPU4)
    mg = {r: v["megatron"] for r, v in got["rows"].items()}
    assert mg["weights"] == pytest.approx(2 * shard) and mg["grads"] == pytest.approx(4 * shard)
    assert mg["optimizer state + masters"] == pytest.approx(12 / dp * shard)
    assert mg["activations"] == pytest.approx(act)
    assert mg["total per device"] == pytest.approx(shard * (6 + 12 / dp) + act)
    assert got["megatron"]["activations_sp"] == pytest.approx(
        (s * b * h * 34 * L + 8 * s * b + s * b * h + s * b * h * 4 * (1 + V / h)) / t)
    # ours: the busiest stage's breakdown, summing to its peak
    ours = {r: v["ours"] for r, v in got["rows"].items()}
    assert ours["total per device"] == max(pl.peak_bytes_per_stage)
    assert sum(ours[r] for r in ("weights", "grads", "optimizer state + masters", "activations", "other")) == \
        ours["total per device"] + ours["host memory"]


def test_measure_peak_measures_and_refuses_with_peak_tflops(capsys):
    got = measure_peak_tflops(seconds=0.05, device="cpu", n=64)
    assert got["tflops"] > 0 and got["iters"] >= 1 and got["dtype"] == "float32" and got["seconds"] >= 0.05
    assert plan_main(["--measure-peak", "--peak-tflops", "100"]) == 2
    err = capsys.readouterr().err
    assert "--measure-peak" in err and "--peak-tflops 100" in err


def test_offload_costs_time_and_ranks_below():
    cfg = _gpt("model.zero_stage=2", "model.micro_batch_size=2", "model.global_batch_size=8")
    base = plan(cfg, GPU4)
    cfg.model.offload_optimizer = "cpu"
    off = plan(cfg, GPU4)
    P = off.params["per_rank_per_stage"][0]
    part = math.ceil(P / 4)
    # fp32 gradient partition to the host, the updated fp32 (model dtype: precision 32) partition back, CPU Adam
    assert off.offload["d2h_bytes"] == 4 * part and off.offload["h2d_bytes"] == 4 * part
    assert off.offload["time_s"] == pytest.approx(8 * part / 25e9 + part / 5e8)
    assert off.predicted_step_time_s == pytest.approx(base.predicted_step_time_s + off.offload["time_s"])
    assert base.offload["time_s"] == 0
    # ZeRO-3 parameter offload: the weight partition fetched per forward and backward of each micro-batch
    cfg.model.zero_stage, cfg.model.offload_param = 3, "cpu"
    p3 = plan(cfg, GPU4)
    assert p3.offload["h2d_bytes"] == 4 * part + 4 * part * 2 * p3.layout["micro_batches"]
    # the search: wherever a layout is listed with and without offload, the offloaded one ranks below
    plans = search(_gpt("model.global_batch_size=8"), GPU4, top=10_000)
    order = {}
    for i, p in enumerate(plans):
        lay = p.layout
        key = (lay["tp"], lay["pp"], lay["zero_stage"], lay["micro_batch_size"], lay["checkpointing"])
        order.setdefault(key, {})[(lay["offload_optimizer"], lay["offload_param"])] = i
    pairs = [v for v in order.values() if (False, False) in v and len(v) > 1]
    assert pairs
    for v in pairs:
        assert all(v[(False, False)] < i for k, i in v.items() if k != (False, False))


def test_announce_logs_each_stage_prediction(caplog):
    cfg = _gpt("trainer.accelerator=cpu", "trainer.devices=2", "model.pipeline_model_parallel_size=2",
               "model.micro_batch_size=2", "model.global_batch_size=4")
    pc = PlanCheck(torch.device("cpu"), 1)
    assert pc.announce(cfg, 1) == []
    with caplog.at_level("INFO", logger="megatron_ext"):
        lines = pc.announce(cfg, 0)
    assert len(lines) == 2 and all(line in caplog.text for line in lines)
    for stage, line in enumerate(lines):
        pred = predicted_for_check(cfg, stage)
        assert line.startswith(f"plan_check prediction, rank {stage} (stage {stage}): peak "
                               f"{pred['peak_bytes'] / 2**20:.1f} MiB of host memory")
        assert "weights" in line and "activations" in line and f"pp_send {pred['comm_bytes']['pp_send']}" in line
    mega = _gpt("trainer.accelerator=cpu", "model.arch=mega")
    (line,) = pc.announce(mega, 0)
    assert "does not model this run" in line
