"""``tools/plan.py --compare``: the planner's per-rank bytes beside DeepSpeed's estimator and Megatron-LM's formulas.

Three columns for the busiest rank (the pipeline stage with the largest predicted peak) of one layout:

* **ours** -- :func:`megatron_ext.planning.planner.plan`'s breakdown of that stage.
* **DeepSpeed** -- DeepSpeed's own functions, called here: ``estimate_zero2_model_states_mem_needs`` (ZeRO 1 and 2:
  DeepSpeed has no ZeRO-1 estimator) or ``estimate_zero3_model_states_mem_needs`` (ZeRO 3, ``zero_init=False``:
  our engine does not build the model under ``deepspeed.zero.Init``), the computations behind the
  ``*_all_cold`` printers (whose printout is captured and shown too). They model *model states only*, and data
  parallelism only: we pass the rank's model-parallel shard (its parameters after TP / PP) as ``total_params``
  and the data-parallel group as the GPUs (``num_gpus_per_node`` = DP ranks in a node). Per GPU, without offload:
  ZeRO-2 ``2P + 18P/N`` (16-bit weights; 2 + 4 bytes of 16-bit and fp32 gradients, 4 of fp32 masters and 8 of
  Adam moments, per partition), ZeRO-3 ``4 * largest_layer + 18P/N``. With ``offload_optimizer`` ZeRO-2 keeps
  ``2P`` on the GPU, ZeRO-3 ``4 * largest_layer + 2P/N`` (``+ offload_param``: ``4 * largest_layer``). The CPU
  figure is per node and carries DeepSpeed's ``additional_buffer_factor`` (1.5). ZeRO 0 has no DeepSpeed
  estimator: the column is empty.
* **Megatron** -- the formulas of Megatron-LM's ``megatron/training/theoretical_memory_usage.py``, implemented
  here (:func:`megatron_memory`): parameters of the most loaded shard ``(block / pp + embedding) / tp`` (plus the
  untied output layer when pp = 1) times 18 bytes (2 bf16 weight + 4 fp32 gradient accumulation buffer + 4 fp32
  master + 8 Adam) or, with the distributed optimizer (our ZeRO >= 1), ``6 + 12 / dp``; activations by Korthikanti
  et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", Table 2) for selective
  recomputation: without sequence parallelism (ours has none) ``s b h (10 + 24 / t)`` per layer, with it
  ``s b h (18 + 4 f / h) / t``; times the layers, + embedding input and dropout mask per in-flight micro-batch,
  + the output layer and loss inputs when pp = 1. README "Planning a run" writes every term out.
"""
from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Optional

from omegaconf import DictConfig

from megatron_ext.config.model_validation import (
    is_encoder_decoder,
    resolve_ffn_hidden_size,
    resolve_max_position_embeddings,
    resolve_num_query_groups,
)
from megatron_ext.errors import ConfigError
from megatron_ext.planning.planner import Machine, Plan

ROWS = ("weights", "grads", "optimizer state + masters", "activations", "other", "total per device",
        "host memory")


def largest_layer_params(cfg: DictConfig, tp: int, vocab_padded: int) -> int:
    """The parameters of the largest single module of one rank (what DeepSpeed's ``stage3.model_to_params`` calls
    the largest layer: the most parameters one module holds itself): the word embedding / output layer shard
    ``V h / tp``, the learned position table, or a layer's fused QKV, projection, fc1 (SwiGLU: gate and up in one)
    or fc2 (row-parallel biases are whole on every rank). GPT only."""
    m = cfg.model
    if is_encoder_decoder(m):
        raise ConfigError("--compare: the DeepSpeed / Megatron comparison is written for GPT models (--task gpt)")
    h, nh = int(m.hidden_size), int(m.num_attention_heads)
    d = h // nh
    g = resolve_num_query_groups(m)
    f = resolve_ffn_hidden_size(m)
    bias = bool(m.bias)
    glu = 2 if str(m.activation).lower() == "swiglu" else 1
    cands = [vocab_padded * h // tp,
             (h * (nh + 2 * g) * d + ((nh + 2 * g) * d if bias else 0)) // tp,
             h * h // tp + (h if bias else 0),
             (h * f * glu + (f * glu if bias else 0)) // tp,
             f * h // tp + (h if bias else 0)]
    if str(m.position_embedding_type).lower() == "learned_absolute":
        cands.append(resolve_max_position_embeddings(m) * h)
    return max(cands)


def _ds_layout(machine: Machine, tp: int, pp: int, dp: int):
    """(num_gpus_per_node, num_nodes) of the data-parallel group for DeepSpeed's estimator (total = dp)."""
    mp = tp * pp
    if mp <= machine.devices_per_node and machine.devices_per_node % mp == 0:
        per_node = machine.devices_per_node // mp
        return per_node, dp // per_node
    return 1, dp


def deepspeed_column(pl: Plan, cfg: DictConfig, machine: Machine) -> Dict[str, object]:
    """DeepSpeed 0.19's estimate for the busiest rank's shard (module docstring): ``{"rows": {row: bytes or None},
    "call": what was called, "printout": the matching ``*_all_cold`` printout}``."""
    lay = pl.layout
    zero, tp, pp, dp = int(lay["zero_stage"]), int(lay["tp"]), int(lay["pp"]), int(lay["dp"])
    stage = max(range(len(pl.peak_bytes_per_stage)), key=lambda i: pl.peak_bytes_per_stage[i])
    P = int(pl.params["per_rank_per_stage"][stage])
    gpn, nodes = _ds_layout(machine, tp, pp, dp)
    N = gpn * nodes
    off_opt, off_par = bool(lay["offload_optimizer"]), bool(lay["offload_param"])
    rows: Dict[str, Optional[float]] = {r: None for r in ROWS}
    if zero == 0:
        return {"rows": rows, "call": "none: DeepSpeed has no estimator for ZeRO 0", "printout": ""}
    out = io.StringIO()
    if zero in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import (
            estimate_zero2_model_states_mem_needs,
            estimate_zero2_model_states_mem_needs_all_cold,
        )

        cpu, gpu = estimate_zero2_model_states_mem_needs(total_params=P, num_gpus_per_node=gpn, num_nodes=nodes,
                                                         cpu_offload=off_opt, additional_buffer_factor=1.5)
        with contextlib.redirect_stdout(out):
            estimate_zero2_model_states_mem_needs_all_cold(total_params=P, num_gpus_per_node=gpn, num_nodes=nodes)
        call = (f"estimate_zero2_model_states_mem_needs(total_params={P}, num_gpus_per_node={gpn}, "
                f"num_nodes={nodes}, cpu_offload={off_opt})")
        rows["weights"] = 2 * P
        if off_opt:
            rows["grads"] = rows["optimizer state + masters"] = 0
        else:
            rows["grads"] = 6 * P / N
            rows["optimizer state + masters"] = 12 * P / N
        rows["other"] = gpu - sum(rows[r] for r in ("weights", "grads", "optimizer state + masters"))  # int()
    else:
        from deepspeed.runtime.zero.stage3 import (
            estimate_zero3_model_states_mem_needs,
            estimate_zero3_model_states_mem_needs_all_cold,
        )

        LL = largest_layer_params(cfg, tp, int(pl.params["padded_vocab_size"]))
        cpu, gpu, ll_mem = estimate_zero3_model_states_mem_needs(
            total_params=P, largest_layer_params=LL, num_gpus_per_node=gpn, num_nodes=nodes, cpu_offload=off_opt,
            cpu_offload_params=off_par, zero_init=False, additional_buffer_factor=1.5)
        with contextlib.redirect_stdout(out):
            estimate_zero3_model_states_mem_needs_all_cold(total_params=P, largest_layer_params=LL,
                                                           num_gpus_per_node=gpn, num_nodes=nodes)
        call = (f"estimate_zero3_model_states_mem_needs(total_params={P}, largest_layer_params={LL}, "
                f"num_gpus_per_node={gpn}, num_nodes={nodes}, cpu_offload={off_opt}, cpu_offload_params={off_par}, "
                f"zero_init=False)")
        # 18 P / N as ZeRO-2's 18 with the 16-bit weights partitioned too: 2 weights + 12 masters and moments,
        # the remaining 4 shown as gradients (DeepSpeed's source gives no split for ZeRO 3)
        rows["weights"] = 0 if (off_opt and off_par) else 2 * P / N
        rows["grads"] = 0 if off_opt else 4 * P / N
        rows["optimizer state + masters"] = 0 if off_opt else 12 * P / N
        rows["other"] = gpu - sum(rows[r] for r in ("weights", "grads", "optimizer state + masters"))  # 4 x LL
    rows["activations"] = None  # model states only
    rows["total per device"] = gpu
    rows["host memory"] = cpu
    return {"rows": rows, "call": call, "printout": out.getvalue()}


def megatron_memory(*, h: int, L: int, nh: int, groups: int, kv_channels: int, ffn: int, swiglu: bool,
                    rmsnorm: bool, vocab_padded: int, untied: bool, tp: int, pp: int, dp: int, s: int, b: int,
                    microbatches: int, distributed_optimizer: bool, sequence_parallel: bool = False) -> Dict[str, float]:
    """Megatron-LM's ``theoretical_memory_usage`` for a dense GPT (no MoE, no MTP, no interleaving), in bytes:
    ``{"params_shard", "bytes_per_param", "weights", "grads", "optimizer", "weights_and_optimizer",
    "activations", "activations_sp", "total"}`` (README "Planning a run" writes the formulas out). ``activations``
    is the figure Megatron reports without sequence parallelism (``compute_activation_memory_without_sp``);
    ``activations_sp`` with it (and selective recomputation). ``total`` uses ``activations_sp`` when
    ``sequence_parallel`` else ``activations``."""
    norm = 1 if rmsnorm else 2
    gated = 1.5 if swiglu else 1.0
    attn = 2 * h * h * (1 + groups / nh) * (kv_channels * nh / h)
    layer = 2 * h * (ffn * gated + norm) + attn
    block = layer * L + norm * h
    emb = h * vocab_padded
    shard = (block / pp + emb) / tp
    if untied and pp == 1:
        shard += emb / tp
    per_param = 6 + 12 / dp if distributed_optimizer else 18.0
    in_flight = min(1.0, microbatches / pp) if pp > 1 else 1.0
    emb_act = 8 * s * b * pp + s * b * h * pp
    # without sequence parallelism (Korthikanti et al. 2022, Table 2, tensor parallel + selective recompute)
    no_sp = (s * b * h * (10 + 24 / tp) * L + emb_act) * in_flight
    if pp == 1:
        no_sp += (s * b * vocab_padded / tp + s * b * h) * 2
    no_sp *= 1.05
    # with sequence parallelism (ibid., 34 s b h / t per layer for ffn = 4h)
    sp = (s * b * h * (18 + 4 * ffn / h) * L + emb_act) * in_flight
    if pp == 1:
        sp += s * b * h * 4 * (1 + vocab_padded / h)
    sp /= tp
    act = sp if sequence_parallel else no_sp
    wo = shard * per_param
    return {"params_shard": shard, "bytes_per_param": per_param, "weights": 2 * shard, "grads": 4 * shard,
            "optimizer": (12 / dp if distributed_optimizer else 12) * shard, "weights_and_optimizer": wo,
            "activations": no_sp, "activations_sp": sp, "total": wo + act}


def megatron_column(pl: Plan, cfg: DictConfig) -> Dict[str, object]:
    m = cfg.model
    if is_encoder_decoder(m):
        raise ConfigError("--compare: the DeepSpeed / Megatron comparison is written for GPT models (--task gpt)")
    lay = pl.layout
    h, nh = int(m.hidden_size), int(m.num_attention_heads)
    mm = megatron_memory(h=h, L=int(m.num_layers), nh=nh, groups=resolve_num_query_groups(m), kv_channels=h // nh,
                         ffn=resolve_ffn_hidden_size(m), swiglu=str(m.activation).lower() == "swiglu",
                         rmsnorm=str(m.normalization).lower() == "rmsnorm",
                         vocab_padded=int(pl.params["padded_vocab_size"]),
                         untied=not bool(m.share_embeddings_and_output_weights), tp=int(lay["tp"]),
                         pp=int(lay["pp"]), dp=int(lay["dp"]), s=int(m.seq_length), b=int(lay["micro_batch_size"]),
                         microbatches=int(lay["micro_batches"]), distributed_optimizer=int(lay["zero_stage"]) >= 1)
    rows = {"weights": mm["weights"], "grads": mm["grads"], "optimizer state + masters": mm["optimizer"],
            "activations": mm["activations"], "other": 0.0, "total per device": mm["total"], "host memory": None}
    return {"rows": rows, "megatron": mm}


def ours_column(pl: Plan) -> Dict[str, object]:
    """The plan's busiest stage at its peak (``at_peak_per_stage``: the items sum to the peak, plus the offloaded
    states, which are host memory): gradients are those alive at the peak, "other" the ZeRO buffers, gathered
    ZeRO-3 weights and the CPU runtime term."""
    stage = max(range(len(pl.peak_bytes_per_stage)), key=lambda i: pl.peak_bytes_per_stage[i])
    at = dict(pl.bytes_per_rank["at_peak_per_stage"][stage])
    host = int(pl.bytes_per_rank["per_stage"][stage].get("host_offloaded", 0))
    total = int(pl.peak_bytes_per_stage[stage])
    rows = {"weights": at.pop("weights", 0), "grads": at.pop("grads", 0),
            "optimizer state + masters": at.pop("masters", 0) + at.pop("optimizer", 0),
            "activations": at.pop("activations", 0)}
    rows["other"] = sum(at.values())  # ZeRO buffers, gathered ZeRO-3 weights, the CPU runtime term
    # with offload the states above include the offloaded ones (the host memory row); the device total does not
    rows["total per device"] = total
    rows["host memory"] = host
    return {"rows": rows, "stage": stage}


def compare(pl: Plan, cfg: DictConfig, machine: Machine) -> Dict[str, object]:
    """The three columns for ``pl`` (a plan of ``cfg`` on ``machine``, all ranks): ``{"layout", "stage",
    "rows": {row: {"ours", "deepspeed", "megatron"}}, "deepspeed_call", "deepspeed_printout", "megatron"}``."""
    if machine.cpu:
        raise ConfigError("--compare with --cpu: DeepSpeed's estimator and Megatron's formulas are for GPUs")
    ours, ds, mg = ours_column(pl), deepspeed_column(pl, cfg, machine), megatron_column(pl, cfg)
    rows = {r: {"ours": ours["rows"][r], "deepspeed": ds["rows"][r], "megatron": mg["rows"][r]} for r in ROWS}
    return {"layout": pl.layout, "stage": ours["stage"], "params_per_rank": pl.params["per_rank_per_stage"][
        ours["stage"]], "rows": rows, "deepspeed_call": ds["call"], "deepspeed_printout": ds["printout"],
            "megatron": mg["megatron"]}


def compare_table(c: Dict[str, object]) -> str:
    def gib(x) -> str:
        return "-" if x is None else f"{x / 2 ** 30:.2f} GiB"

    lines: List[str] = [f"{'per rank (stage ' + str(c['stage']) + ')':<27}{'ours':>14}{'DeepSpeed':>14}"
                        f"{'Megatron':>14}"]
    for r, v in c["rows"].items():
        lines.append(f"{r:<27}{gib(v['ours']):>14}{gib(v['deepspeed']):>14}{gib(v['megatron']):>14}")
    mm = c["megatron"]
    lines.append(f"parameters on the rank: ours {c['params_per_rank']:,}, Megatron's most loaded shard "
                 f"{mm['params_shard']:,.0f} x {mm['bytes_per_param']:.2f} bytes; Megatron activations with "
                 f"sequence parallelism: {gib(mm['activations_sp'])}")
    lines.append(f"DeepSpeed: {c['deepspeed_call']} (host memory: per node)")
    if c["deepspeed_printout"]:
        lines += ["  " + x for x in str(c["deepspeed_printout"]).rstrip().splitlines()]
    return "\n".join(lines)
