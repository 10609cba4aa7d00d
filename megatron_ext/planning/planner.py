"""The analytic plan of a run: parameters, memory per rank, FLOPs, step time and communication per rank.

``plan(cfg, machine)`` takes a composed, checked ``pretrain_gpt.py`` / ``pretrain_bart.py`` config (the entry
points' Hydra composition; ``megatron_ext.cli.plan`` builds it) and a :class:`Machine`, and returns a
:class:`Plan`. Every figure follows how *this* code base allocates, not a textbook formula:

Parameters (per rank after TP / PP): the layers of ``megatron_ext.modules`` -- fused QKV ``h*(n_h + 2 n_g)*d``
(+ bias), output projection ``h*h`` (bias replicated), MLP ``h*f`` x 2 (GELU) or 3 (SwiGLU), norms (LayerNorm:
weight + bias with ``model.bias``; RMSNorm: weight), vocabulary-parallel word embeddings over the *padded*
vocabulary, learned position tables (GPT: one, BART: encoder + decoder), an own output layer unless tied. Under
pipeline parallelism DeepSpeed's pipeline engine keeps a tied copy of the embedding on the last stage.

Model states (bytes per parameter of the rank, ``P``; ``dp`` = data-parallel size), by the optimizer wrapper
DeepSpeed 0.19 picks for our DeepSpeed JSON (``training/engine.py``: ``grad_accum_dtype`` unset, so gradients are
accumulated in the model dtype):

============================  =========  ==============  ==============  ====================  =================
precision / ZeRO               weights    gradients       fp32 masters    optimizer state (k)   fp32 grads at step
============================  =========  ==============  ==============  ====================  =================
fp32, ZeRO 0                   4          4               --              k                     --
fp32, ZeRO 1 / 2               4          4 / 4 x bucket  4/dp            k/dp                  4/dp
fp32, ZeRO 3                   4/dp       4/dp            4/dp            k/dp                  --
bf16, ZeRO 0 (no PP)           2          2               4               k                     4  (FP16_Optimizer)
bf16, ZeRO 0 + PP              2          2               4/dp            k/dp                  --  (BF16_Optimizer)
bf16, ZeRO 1 / 2               2          2 / 2 x bucket  4/dp            k/dp                  4/dp
bf16, ZeRO 3                   2/dp       2/dp            4/dp            k/dp                  4/dp
============================  =========  ==============  ==============  ====================  =================

``k`` = optimizer state bytes per parameter (Adam / AdamW: 8, SGD with momentum: 4, ...; :data:`OPTIMIZER_STATE`).
What the table calls gradients is where they live: ZeRO 0 / 1 the whole gradient from backward to the step; ZeRO 2
a reduce bucket's worth (``min(P, 5e8)`` elements) until the bucket is reduced into the fp32 partition (``4/dp``,
kept from backward to the step); ZeRO 3 the model-dtype partition (fp32 ZeRO 3: the partition's own buffer, no
second fp32 copy). DeepSpeed's buffers on top (read from a tensor inventory of the engine): ZeRO 3's reduce bucket
of ``reduce_bucket_size`` elements (500M, whatever the model; on a CPU machine only the touched ``min(P, 5e8)`` is
resident), the weights it gathers for forward / backward while they fit ``stage3_max_live_parameters`` (1e9) and
the prefetch bucket's coalesced all-gather output (5e7) through the forward; the CPU-offload path (ZeRO 1 / 2): a
model-dtype copy of the partition, two fp32 staging buffers of the largest parameter, and the fp32 gradient
partition kept between steps. ``model.offload_optimizer=cpu`` moves masters, optimizer state and fp32 gradient
partitions to host memory; ``model.offload_param=cpu`` (ZeRO 3) the weight partitions. On a CPU machine all of it
is process memory, plus :data:`CPU_RUNTIME_BYTES` (the CPU kernels' own memory, measured).

Activations per micro-batch (``T = b*s`` tokens, ``p`` = model-dtype bytes, ``t`` = TP), counted as autograd
saves them (tests/unit/test_planner.py checks them against ``saved_tensors_hooks`` on built models): per layer the
norms' saves (LayerNorm: input + mean / rstd in ``p``; our RMSNorm: fp32 input and normalized copies + fp32 rstd),
the inputs of the column-parallel linears (full width under TP: ``T*p*h`` each, 2 per layer, 3 with cross
attention), the MLP's ``m_a*f/t`` intermediates (GELU 2, SwiGLU 4), the attention core
(:func:`_attention_core_bytes`: SDPA's q, k, v, output (= the projection's input) and fp32 log-sum-exp; GQA keeps
k / v three times; under attention dropout the math path's q, k, v, three ``b x n_h/t x s x s_kv`` tensors --
fp32 on CPU -- and a copy of the context), with hidden dropout one mask per residual branch; outside the layers
the embedding's dropout mask, the final norm's saves and the LM head's input (and a BART encoder's output, once).
With ``activations_checkpoint_granularity=full`` a layer keeps only its input and one layer's full set is live
again while recomputing. The LM head adds the logits ``T*V/t`` in ``p`` plus fp32 for the loss and its gradient.

The peak of a stage is the larger of two phases. Forward / backward: the states, ZeRO 3's gathered weights, and the
larger of (all activations alive at the first backward + the gradients made first -- the head's and the
embedding's) and (the activations still alive when the gradients are complete + all of them), since backward frees
activations as it makes gradients; the activations alive are one micro-batch's without PP, ``min(pp - stage, m)``
on a 1F1B pipeline stage (DeepSpeed ``TrainSchedule``), and with accumulation a later micro-batch's stand beside
the earlier ones' gradients. Optimizer step: the states + the gradients the step reads (bf16: the fp32 partition
too). The bubble fraction is ``(pp - 1) / (m + pp - 1)``.

Communication bytes per rank per step (bytes passed to collectives by this rank), as counted on real runs
(bench/bench_plan.py): TP all-reduces of ``T*h*p``: per layer 2 forward (attention and MLP outputs) + 2 backward
(the inputs of qkv and fc1) + 1 when recomputed (non-reentrant checkpointing stops recomputing after the last
tensor backward needs, before the MLP's all-reduce); a decoder layer 3 + 3 + 1 on the memory (+ 2 recomputed); the
embedding lookup (first stage), the LM head's input gradient and 3 fp32 ``T`` for the vocabulary-parallel cross
entropy (last stage). DP by ZeRO stage (0, 1, 2: all-reduce of the gradients -- DeepSpeed 0.19's ZeRO-2
"reduce-scatter" all-reduces the bucket's slices; 1 / 2: + all-gather of the updated weights; 3: reduce-scatter of
the gradients + all-gather of the weights once a step while they fit ``stage3_max_live_parameters``, again in
backward (and recompute) above it); PP: the ``T*h*p`` activations sent forward and gradients sent backward per
micro-batch at each stage boundary, and (tied GPT embeddings) the all-reduce of the word embedding's gradient
between the first and the last stage (``pp_allreduce``). ``predicted_for_check(cfg, rank)`` gives one rank's
peak and bytes by the kinds ``measure.CollectiveCounter`` counts (``pp_send`` / ``pp_recv`` too) for
``trainer.plan_check``. The predicted time of each kind uses a ring's ``2 (n - 1) / n`` (all-reduce) or
``(n - 1) / n`` factor over the group's bandwidth (intra-node when the group fits in a node, else inter-node) and
is not overlapped with compute.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from megatron_ext.config.loader import PRECISIONS, validate_config

from megatron_ext.config.model_validation import (
    is_encoder_decoder,
    normalize_checkpoint_granularity,
    resolve_encdec_max_position_embeddings,
    resolve_ffn_hidden_size,
    resolve_max_position_embeddings,
    resolve_num_query_groups,
    resolve_seq_length_dec,
)
from megatron_ext.errors import ConfigError
from megatron_ext.models.families import family_of_config
from megatron_ext.models.flops import encdec_flops_per_iteration, gpt_flops_per_iteration
from megatron_ext.models.gpt import padded_vocab_size

GIB = 1024 ** 3

# optimizer state bytes per (fp32 master) parameter, by model.optim.name; a callable gets the optim section
OPTIMIZER_STATE = {
    "adam": 8, "adamw": 8, "fused_adam": 8, "cpu_adam": 8, "adamax": 8, "adadelta": 8, "rprop": 8,
    "adagrad": 4,
    "sgd": lambda o: 4 if float(o.get("momentum", 0.0) or 0.0) else 0,
    "rmsprop": lambda o: 4 + (4 if float(o.get("momentum", 0.0) or 0.0) else 0) + (4 if o.get("centered") else 0),
}
ZERO_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters
ZERO3_PREFETCH_ELEMENTS = 50_000_000  # DeepSpeed's default stage3_prefetch_bucket_size
# memory a CPU training process holds besides tensors once its first step has run, by model-dtype bytes: measured
# on this machine as the resident heap minus every tensor storage before a forward (tensor inventory, README
# "Planning a run"): 1.6-3.0 MiB in fp32, 11.4-14.1 MiB in bf16 (oneDNN's primitive cache and scratchpads of
# the bf16 GEMMs; ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 removes ~6.6 MiB of it), whatever the model size
CPU_RUNTIME_BYTES = {4: 2 << 20, 2: 12 << 20}


@dataclass
class Machine:
    """The target machine. ``cpu``: a CPU run, every byte is host memory of the process (``host_memory_gb``)."""

    devices_per_node: int = 8
    nodes: int = 1
    device_memory_gb: float = 80.0
    peak_tflops: float = 989.0  # dense bf16 of an H100 SXM
    intra_node_gbps: float = 300.0  # GB/s a device reaches to another in its node (NVLink, one direction)
    inter_node_gbps: float = 25.0  # GB/s per device across nodes (200 Gbit/s InfiniBand)
    compute_efficiency: float = 0.5  # fraction of peak_tflops that the matmuls reach
    cpu: bool = False
    host_memory_gb: float = 0.0
    # offload (model.offload_optimizer / offload_param): host <-> device copies and the optimizer step on the CPU
    host_gbps: float = 25.0  # GB/s one device reaches to host memory (PCIe gen4 x16: ~25 of its 32 GB/s)
    cpu_adam_params_per_s: float = 5e8  # parameters / s one rank's share of the host updates (DeepSpeed CPU Adam)

    @property
    def world_size(self) -> int:
        return int(self.devices_per_node) * int(self.nodes)

    def check(self) -> None:
        for name in ("devices_per_node", "nodes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"machine {name}={v!r}: expected a positive integer")
        for name in ("device_memory_gb", "peak_tflops", "intra_node_gbps", "inter_node_gbps", "host_gbps",
                     "cpu_adam_params_per_s"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"machine {name}={getattr(self, name)!r}: expected a number > 0")
        if not 0 < float(self.compute_efficiency) <= 1:
            raise ConfigError(f"machine compute_efficiency={self.compute_efficiency!r}: expected a fraction in (0, 1]")


@dataclass
class Plan:
    task: str
    layout: Dict[str, object]
    params: Dict[str, int]
    bytes_per_rank: Dict[str, object]
    peak_bytes_per_stage: List[int]
    peak_bytes_per_rank: List[int]
    host_bytes_per_rank: List[int]
    memory_limit_bytes: int
    headroom_bytes: int
    fits: bool
    flops_per_step: int
    tokens_per_step: int
    predicted_step_time_s: float
    predicted_compute_time_s: float
    predicted_mfu: float
    comm_bytes_per_rank: Dict[str, int]
    comm_time_s: Dict[str, float]
    notes: List[str] = field(default_factory=list)
    offload: Dict[str, float] = field(default_factory=dict)  # offload_cost(): host <-> device bytes, seconds

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def optimizer_state_bytes(optim) -> int:
    name = str(optim.get("name", "")).lower()
    k = OPTIMIZER_STATE.get(name)
    if k is None:
        raise ConfigError(f"model.optim.name={name!r}: the planner does not know its state size; known: "
                          f"{', '.join(sorted(OPTIMIZER_STATE))}")
    return k(optim) if callable(k) else k


def _precision(cfg) -> str:
    prec = PRECISIONS.get(str(cfg.trainer.precision))
    if prec is None:
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r}: expected one of 32, bf16, 16")
    return prec


def _norm_params(normalization: str, h: int, bias: bool) -> int:
    return h * (2 if str(normalization).lower() == "layernorm" and bias else 1)


def _layer_params(stack, tp: int, *, cross: bool, groups: Optional[int] = None):
    """(sharded over TP, replicated) parameters of one transformer layer of a stack (``model`` or ``model.<side>``)."""
    h, nh = int(stack.hidden_size), int(stack.num_attention_heads)
    d = h // nh
    g = nh if groups is None else groups
    f = resolve_ffn_hidden_size(stack)
    bias = bool(stack.bias)
    glu = str(stack.activation).lower() == "swiglu"
    qkv = h * (nh + 2 * g) * d + ((nh + 2 * g) * d if bias else 0)
    proj_w, proj_b = h * h, (h if bias else 0)
    fc1 = h * f * (2 if glu else 1) + (f * (2 if glu else 1) if bias else 0)
    fc2_w, fc2_b = f * h, (h if bias else 0)
    sharded = qkv + proj_w + fc1 + fc2_w
    replicated = proj_b + fc2_b + 2 * _norm_params(stack.normalization, h, bias)
    if cross:  # linear_q, linear_kv (column-parallel), linear_proj (row-parallel), pre_cross_attn_layernorm
        sharded += 3 * h * h + (3 * h if bias else 0) + h * h
        replicated += (h if bias else 0) + _norm_params(stack.normalization, h, bias)
    return sharded // tp, replicated, sharded + replicated


def _attention_core_bytes(stack, q_tokens: int, kv_tokens: int, s_q: int, s_kv: int, p: int, tp: int, groups: int,
                          cpu: bool) -> int:
    """Bytes the attention core of one layer saves for backward, with the input of the output projection.

    ``scaled_dot_product_attention`` without dropout (the flash / memory-efficient kernels) keeps q, k, v, its
    output (which the output projection takes as its input: the same storage) and an fp32 log-sum-exp per query
    and head. With attention dropout it takes the math path, which keeps q, k (transposed) and v, the softmax
    probabilities, their dropout mask and the dropped probabilities (three ``b x n_h x s_q x s_kv`` tensors), and
    the output projection keeps its own copy of the context; on CPU the math path computes in fp32 whatever the
    model dtype (``c`` = 4 bytes), on GPU in the model dtype."""
    h, nh = int(stack.hidden_size), int(stack.num_attention_heads)
    d = h // nh
    if float(stack.attention_dropout) > 0:
        c = 4 if cpu else p
        b = q_tokens // s_q
        return (q_tokens * c * h // tp + kv_tokens * c * 2 * groups * d // tp + q_tokens * p * h // tp
                + 3 * c * b * (nh // tp) * s_q * s_kv)
    # grouped-query attention (fewer k/v heads than queries): SDPA's enable_gqa path keeps k and v three times
    kv_copies = 3 if groups < nh else 1
    return q_tokens * p * h // tp + kv_copies * kv_tokens * p * 2 * groups * d // tp + q_tokens * p * h // tp \
        + q_tokens * 4 * (nh // tp)


def _norm_saved_bytes(stack, tokens: int, p: int) -> int:
    """What one norm saves for backward: LayerNorm its input and its mean and 1/std (model dtype); our RMSNorm
    computes in fp32 and keeps the fp32 input and normalized tensors and the fp32 1/rms."""
    h = int(stack.hidden_size)
    if str(stack.normalization).lower() == "layernorm":
        return tokens * p * (h + 2)
    return tokens * 4 * (2 * h + 1)


def _largest_layer_param(stack, tp: int, groups: Optional[int] = None) -> int:
    """Elements of a layer's largest weight on one TP rank (fused QKV, or the MLP's first / second weight)."""
    h, nh = int(stack.hidden_size), int(stack.num_attention_heads)
    g = nh if groups is None else groups
    f = resolve_ffn_hidden_size(stack)
    glu = str(stack.activation).lower() == "swiglu"
    return max(h * (nh + 2 * g) * (h // nh), h * f * (2 if glu else 1), f * h) // tp


def _stack_global_bytes(stack, tokens: int, p: int) -> int:
    """What a stack saves outside its layers: its final norm's input and statistics, and with hidden dropout the
    embedding's dropout mask."""
    h = int(stack.hidden_size)
    return tokens * p * h * (float(stack.hidden_dropout) > 0) + _norm_saved_bytes(stack, tokens, p)


def _act_layer_bytes(stack, tokens: int, s: int, p: int, tp: int, *, cross_tokens: int = 0, s_kv: int = 0,
                     groups: Optional[int] = None, cpu: bool = False) -> int:
    """Bytes one pre-norm layer saves for backward over ``tokens`` tokens of sequences of ``s`` (module
    docstring; checked tensor by tensor against autograd's saved tensors in tests/unit/test_planner.py):
    the inputs of its norms and of its column-parallel linears (full width under TP), the attention core
    (:func:`_attention_core_bytes`), the MLP's ``m_a`` intermediate tensors (sharded), the norms' statistics and,
    with hidden dropout, the dropout masks of its residual branches (in the model dtype). A decoder layer
    (``cross_tokens`` = the memory's tokens, ``s_kv`` its sequence length) adds its cross-attention block; the
    memory itself is saved once for all layers (:func:`plan`)."""
    h, nh = int(stack.hidden_size), int(stack.num_attention_heads)
    g = nh if groups is None else groups
    f = resolve_ffn_hidden_size(stack)
    m_a = 4 if str(stack.activation).lower() == "swiglu" else 2
    hd = float(stack.hidden_dropout) > 0
    blocks = 3 if cross_tokens else 2
    total = tokens * p * (blocks * h + m_a * f // tp)  # each block's column-parallel input; MLP intermediates
    total += blocks * _norm_saved_bytes(stack, tokens, p)
    total += _attention_core_bytes(stack, tokens, tokens, s, s, p, tp, g, cpu)
    if cross_tokens:
        total += _attention_core_bytes(stack, tokens, cross_tokens, s, s_kv, p, tp, nh, cpu)
    if hd:
        total += blocks * tokens * p * h  # the residual branches' dropout masks
    return total


def _zero_states(P: int, dp: int, prec: str, zero: int, pp: int, k: int, offload_opt: bool, offload_param: bool):
    """(device bytes, host bytes, breakdown) of the model states of ``P`` parameters (module docstring table)."""
    w = 4 if prec == "32" else 2
    part = math.ceil(P / dp)
    if zero == 0:
        if prec == "32":
            parts = dict(weights=w * P, grads=w * P, masters=0, optimizer=k * P, fp32_grads=0)
        elif pp == 1:  # FP16_Optimizer (bf16 / fp16 with DDP): full fp32 masters, fp32 flat grads at step
            parts = dict(weights=w * P, grads=w * P, masters=4 * P, optimizer=k * P, fp32_grads=4 * P)
        else:  # BF16_Optimizer: masters and optimizer over the DP partition
            parts = dict(weights=w * P, grads=w * P, masters=4 * part, optimizer=k * part, fp32_grads=0)
    else:
        masters = 0 if (prec == "32" and zero == 0) else 4 * part
        if zero == 1:
            grads = w * P
        elif zero == 2:  # a reduce bucket's worth, alive until the bucket is reduced into the fp32 partition
            grads = w * min(P, ZERO_BUCKET_ELEMENTS)
        else:
            grads = w * part
        weights = w * part if zero == 3 else w * P
        fp32_grads = 0 if (zero == 3 and prec == "32") else 4 * part  # fp32 ZeRO 3: the partition's own buffer
        parts = dict(weights=weights, grads=grads, masters=masters, optimizer=k * part, fp32_grads=fp32_grads)
    host = 0
    if offload_opt and zero >= 1:
        host += parts["masters"] + parts["optimizer"] + parts["fp32_grads"]
    if offload_param and zero == 3:
        host += parts["weights"]
    return host, parts


def _ring(kind: str, n: int) -> float:
    if n <= 1:
        return 0.0
    return 2.0 * (n - 1) / n if kind == "allreduce" else (n - 1) / n


def plan(cfg: DictConfig, machine: Machine, rank: Optional[int] = None, vocab_size: Optional[int] = None) -> Plan:
    """The plan of ``cfg`` on ``machine`` (module docstring). ``vocab_size``: the tokenizer's (default: built from
    ``model.tokenizer``). ``rank``: keep the per-rank lists to that rank only."""
    machine.check()
    m = cfg.model
    world = machine.world_size
    tp, pp = int(m.tensor_model_parallel_size), int(m.pipeline_model_parallel_size)
    if world % (tp * pp):
        raise ConfigError(f"{world} devices are not divisible by model.tensor_model_parallel_size ({tp}) x "
                          f"model.pipeline_model_parallel_size ({pp})")
    dp = world // (tp * pp)
    mb, gbs = int(m.micro_batch_size), int(m.global_batch_size)
    if gbs % (mb * dp):
        raise ConfigError(f"model.global_batch_size ({gbs}) is not divisible by model.micro_batch_size ({mb}) x "
                          f"data_parallel_size ({dp})")
    accum = gbs // (mb * dp)
    prec = _precision(cfg)
    p = 4 if prec == "32" else 2
    zero = int(m.zero_stage)
    offload_opt = str(m.get("offload_optimizer") or "none").lower() == "cpu"
    offload_param = str(m.get("offload_param") or "none").lower() == "cpu"
    k = optimizer_state_bytes(m.optim)
    encdec = is_encoder_decoder(m)
    if vocab_size is None:
        vocab_size = int(family_of_config(m).build_tokenizer(m.tokenizer).vocab_size)
    V = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by, tp)
    notes: List[str] = []
    s = int(m.seq_length)
    tokens_mb = mb * s
    if encdec:
        enc, dec = m.encoder, m.decoder
        for side, st in (("encoder", enc), ("decoder", dec)):
            if str(st.arch).lower() != "transformer":
                raise ConfigError(f"model.{side}.arch={st.arch}: the planner models transformer stacks only so far")
        h = int(dec.hidden_size)
        sd = resolve_seq_length_dec(m)
        tied = bool(m.share_embeddings_and_output_weights)
        pos = 2 * resolve_encdec_max_position_embeddings(m) * h if str(m.position_embedding_type).lower() == \
            "learned_absolute" else 0
        es, er, et = _layer_params(enc, tp, cross=False)
        ds_, dr, dt = _layer_params(dec, tp, cross=True)
        Le, Ld = int(enc.num_layers), int(dec.num_layers)
        final_norms = _norm_params(enc.normalization, h, enc.bias) + _norm_params(dec.normalization, h, dec.bias)
        emb_total = V * h + pos
        head_total = 0 if tied else V * h
        total = emb_total + head_total + Le * et + Ld * dt + final_norms
        per_stage = [V * h // tp + pos + (0 if tied else V * h // tp) + Le * (es + er) + Ld * (ds_ + dr)
                     + final_norms]
        ckpt = [normalize_checkpoint_granularity(st.activations_checkpoint_granularity) for st in (enc, dec)]
        full = [_act_layer_bytes(enc, tokens_mb, s, p, tp, cpu=machine.cpu),
                _act_layer_bytes(dec, mb * sd, sd, p, tp, cross_tokens=tokens_mb, s_kv=s, cpu=machine.cpu)]
        # outside the layers: per side the embedding's dropout mask, the final norm's input (+ statistics); the
        # encoder's output (the memory every cross-attention's k/v projection takes), the LM head's input
        glob = (_stack_global_bytes(enc, tokens_mb, p) + _stack_global_bytes(dec, mb * sd, p)
                + tokens_mb * p * h + mb * sd * p * h)
        kept = [Le * (tokens_mb * p * h if ckpt[0] else full[0]), Ld * (mb * sd * p * h if ckpt[1] else full[1])]
        recompute = max(full[0] if ckpt[0] else 0, full[1] if ckpt[1] else 0)
        head_tokens = mb * sd
        act_nockpt = Le * full[0] + Ld * full[1] + glob
        act_ckpt = Le * tokens_mb * p * h + Ld * mb * sd * p * h + glob + max(full)  # + one layer recomputed
        act_stage = [sum(kept) + glob]
        recompute_stage = [recompute]
        layer_grads_stage = [Le * (es + er) + Ld * (ds_ + dr)]
        largest_param = max(V * h // tp, _largest_layer_param(enc, tp), _largest_layer_param(dec, tp))
        # encoder layer: 2 forward (attention, MLP outputs) + 2 backward (the inputs of qkv and fc1) + 1 recomputed
        # (non-reentrant checkpointing stops its recompute after the last tensor backward needs: the MLP's output
        # all-reduce is never recomputed); decoder layer: 3 forward (self, cross, MLP) + 3 backward on its own
        # tokens (qkv, q, fc1) + 1 on the memory (the kv projection's input) + 2 recomputed; plus the two embedding
        # lookups, the LM head's input gradient and the vocabulary-parallel cross entropy's 3 fp32 per token
        tp_bytes_mb = (tokens_mb * h * p * (4 * Le + Le * bool(ckpt[0]))
                       + mb * sd * h * p * (6 * Ld + 2 * Ld * bool(ckpt[1]))
                       + tokens_mb * h * p * Ld
                       + (tokens_mb + mb * sd) * h * p
                       + mb * sd * h * p
                       + 3 * 4 * mb * sd)
        tp_stage = [tp_bytes_mb]
        flops = encdec_flops_per_iteration(m, V, gbs)
        tokens_step = gbs * (s + sd)
        stage_layers = [Le + Ld]
    else:
        if str(m.get("arch", "transformer")).lower() != "transformer":
            raise ConfigError(f"model.arch={m.arch}: the planner models the transformer GPT only so far")
        h = int(m.hidden_size)
        L = int(m.num_layers)
        g = resolve_num_query_groups(m)
        tied = bool(m.share_embeddings_and_output_weights)
        pos = resolve_max_position_embeddings(m) * h if str(m.position_embedding_type).lower() == \
            "learned_absolute" else 0
        ls, lr, lt = _layer_params(m, tp, cross=False, groups=g)
        final_norm = _norm_params(m.normalization, h, m.bias)
        total = V * h + pos + (0 if tied else V * h) + L * lt + final_norm
        # DeepSpeed's partition_method="type:TransformerLayerPipe": layers spread evenly, earlier stages the rest
        stage_layers = [L // pp + (1 if i < L % pp else 0) for i in range(pp)]
        per_stage = []
        for i, n in enumerate(stage_layers):
            params = n * (ls + lr)
            if i == 0:
                params += V * h // tp + pos
            if i == pp - 1:
                params += final_norm
                if not tied or pp > 1:  # own output layer, or DeepSpeed's tied copy of the whole EmbeddingPipe
                    params += V * h // tp + (pos if tied else 0)
            per_stage.append(params)
        ckpt = normalize_checkpoint_granularity(m.activations_checkpoint_granularity)
        full = _act_layer_bytes(m, tokens_mb, s, p, tp, groups=g, cpu=machine.cpu)
        # outside the layers: the embedding's dropout mask, the final norm's input (+ statistics), the LM head's
        # input (on the last stage); a later pipeline stage's received input is its first layer's norm input
        glob = _stack_global_bytes(m, tokens_mb, p) + tokens_mb * p * h
        act_nockpt = L * full + glob
        act_ckpt = L * tokens_mb * p * h + glob + full  # + one layer recomputed
        act_stage = [n * (tokens_mb * p * h if ckpt else full) + (glob if i == pp - 1 else 0)
                     for i, n in enumerate(stage_layers)]
        recompute_stage = [full if ckpt else 0 for _ in stage_layers]
        layer_grads_stage = [n * (ls + lr) for n in stage_layers]
        # per layer 2 forward all-reduces (attention, MLP outputs) + 2 backward (inputs of qkv and fc1) + 1
        # recomputed (non-reentrant checkpointing stops after the last saved tensor: the MLP's all-reduce is not
        # redone); the first stage's embedding lookup; the last stage's LM head input gradient and the
        # vocabulary-parallel cross entropy's 3 fp32 per token
        tp_stage = [tokens_mb * h * p * (4 * n + (n if ckpt else 0) + (i == 0) + (i == pp - 1))
                    + (3 * 4 * tokens_mb if i == pp - 1 else 0) for i, n in enumerate(stage_layers)]
        largest_param = max(V * h // tp, _largest_layer_param(m, tp, g))
        head_tokens = tokens_mb
        flops = gpt_flops_per_iteration(m, V, gbs)
        tokens_step = gbs * s
    head = head_tokens * (V // tp) * (p + 4) + head_tokens * (V // tp) * 4  # logits, fp32 loss, backward grad
    emb_params = V * h + pos
    stages = len(per_stage)
    # pipeline micro-batches in flight per stage (DeepSpeed TrainSchedule.num_pipe_buffers)
    in_flight = [min(pp - i, accum) if pp > 1 else 1 for i in range(stages)]
    bubble = (pp - 1) / (accum + pp - 1)
    peaks, hosts, breakdowns, phases, at_peak = [], [], [], [], []
    for i in range(stages):
        P_i = per_stage[i]
        host, parts = _zero_states(P_i, dp, prec, zero, pp, k, offload_opt, offload_param)
        parts = dict(parts)
        # ZeRO 3: the reduce bucket DeepSpeed allocates at reduce_bucket_size elements (on a CPU machine only the
        # part the gradients touch is resident), and the weights gathered for forward / backward (all of them while
        # they fit stage3_max_live_parameters)
        w = 4 if prec == "32" else 2
        if zero == 3:
            parts["buffers"] = w * (min(P_i, ZERO_BUCKET_ELEMENTS) if machine.cpu else ZERO_BUCKET_ELEMENTS)
            # + the coalesced all-gather's flat output of the prefetch bucket, alive through the forward
            parts["gathered_weights"] = w * (min(P_i, ZERO3_MAX_LIVE_PARAMETERS) + min(P_i, ZERO3_PREFETCH_ELEMENTS))
        if offload_opt and zero in (1, 2):
            # DeepSpeed's CPU-offload path: a model-dtype copy of the partition (the updated weights' staging),
            # two gradient staging buffers of the largest parameter, and the fp32 gradient partition kept between
            # steps (the offloaded master's .grad)
            parts["buffers"] = parts.get("buffers", 0) + w * math.ceil(P_i / dp) + 2 * 4 * largest_param
            parts["persistent_fp32_grads"] = parts["fp32_grads"]
        if machine.cpu:  # the CPU kernels' own memory (module docstring): oneDNN's caches for bf16 GEMMs
            parts["runtime"] = CPU_RUNTIME_BYTES[p]
        last = i == stages - 1
        head_i = head if last else 0
        # the phases (module docstring): forward / backward, then the optimizer step
        base = (parts["weights"] + parts["masters"] + parts["optimizer"] + parts.get("buffers", 0)
                + parts.get("runtime", 0))
        # what backward leaves (ZeRO 2: the fp32 partition it reduces into; with offload that partition is kept)
        g_bwd = parts["grads"] + (parts["fp32_grads"] if zero == 2 or "persistent_fp32_grads" in parts else 0)
        g_step = parts["fp32_grads"] + (parts["grads"] if zero != 2 else 0)
        g_first = g_bwd * max(P_i - layer_grads_stage[i], 0) // max(P_i, 1)  # the head's / embedding's, first
        n_live = in_flight[i]
        later = n_live if accum > n_live else n_live - 1
        a = act_stage[i]
        start_bwd, end_bwd = n_live * a + g_first, later * a + g_bwd
        fwd_bwd = base + parts.get("gathered_weights", 0) + head_i + recompute_stage[i] + max(start_bwd, end_bwd)
        step_phase = base + g_step
        # what the peak is made of (sums to it): the states, and at a forward/backward peak the activations and
        # the gradients alive then, at a step peak the gradients the step reads
        at = {"weights": parts["weights"], "masters": parts["masters"], "optimizer": parts["optimizer"],
              "buffers": parts.get("buffers", 0) + parts.get("gathered_weights", 0), "runtime": parts.get("runtime", 0)}
        if fwd_bwd >= step_phase:
            at["grads"] = g_first if start_bwd >= end_bwd else g_bwd
            at["activations"] = head_i + recompute_stage[i] + (n_live if start_bwd >= end_bwd else later) * a
        else:
            at["grads"], at["activations"] = g_step, 0
        act = head_i + recompute_stage[i] + n_live * a  # the most alive at once: at the first backward
        peak = max(fwd_bwd, step_phase)
        if not machine.cpu:
            peak -= host  # offloaded states live in host memory
        peaks.append(peak)
        hosts.append(0 if machine.cpu else host)
        breakdowns.append({**parts, "activations": act, "host_offloaded": host})
        at_peak.append({k_: int(v) for k_, v in at.items()})
        phases.append("forward/backward" if fwd_bwd >= step_phase else "optimizer step")
    # ranks: megatron-core order, tp fastest, then dp, then pp
    per_rank_stage = [r // (tp * dp) for r in range(world)]
    peak_ranks = [peaks[st] for st in per_rank_stage]
    host_ranks = [hosts[st] for st in per_rank_stage]
    limit = int((machine.host_memory_gb if machine.cpu else machine.device_memory_gb) * GIB)
    worst = max(peaks)
    # communication per rank per step (stage 0's rank: the busiest in TP terms is the one with the most layers)
    comm: Dict[str, int] = {k_: 0 for k_ in ("tp_allreduce", "tp_allgather", "dp_allreduce", "dp_reduce_scatter",
                                           "dp_allgather", "pp_sendrecv")}
    w = 4 if prec == "32" else 2
    P0 = max(per_stage)
    tp_allreduce_stage = [accum * x if tp > 1 else 0 for x in tp_stage]
    comm["tp_allreduce"] = max(tp_allreduce_stage)
    if dp > 1:
        if zero in (0, 1, 2):
            # ZeRO 0 all-reduces the gradients; so do ZeRO 1 and 2 in DeepSpeed 0.19: stage 1 through
            # allreduce_bucket, stage 2's "reduce-scatter" (average_tensor) through all-reduces of the bucket's
            # slices (use_multi_rank_bucket_allreduce, on by default) -- measured on CPU, read in the source
            comm["dp_allreduce"] = w * P0
        if zero >= 1:
            # ZeRO 1 / 2: the updated weights once. ZeRO 3: the weights in forward; backward (and recompute) gathers
            # them again only where they were released, which DeepSpeed does not do while the stage's parameters fit
            # stage3_max_live_parameters (and are reused within stage3_max_reuse_distance, the same default)
            again = (2 if _any_ckpt(cfg) else 1) if P0 > ZERO3_MAX_LIVE_PARAMETERS else 0
            comm["dp_allgather"] = w * P0 * ((1 + again) if zero == 3 else 1)
        if zero == 3:
            comm["dp_reduce_scatter"] = w * P0
    if pp > 1:
        # first / last stage: activations or gradients one way, the other the other way; a middle stage both ways
        # at both boundaries (sent + received bytes, the busiest stage)
        comm["pp_sendrecv"] = accum * tokens_mb * h * p * (4 if pp > 2 else 2)
        if tied and not encdec:  # DeepSpeed's tied EmbeddingPipe: the word embedding's gradient, first <-> last
            comm["pp_allreduce"] = w * (V * h // tp)
    intra = machine.intra_node_gbps * 1e9
    inter = machine.inter_node_gbps * 1e9
    tp_bw = intra if tp <= machine.devices_per_node else inter
    dp_bw = intra if tp * dp <= machine.devices_per_node else inter
    pp_bw = intra if tp * dp * pp <= machine.devices_per_node else inter
    comm_time = {
        "tp_allreduce": comm["tp_allreduce"] * _ring("allreduce", tp) / tp_bw,
        "tp_allgather": comm["tp_allgather"] * _ring("allgather", tp) / tp_bw,
        "dp_allreduce": comm["dp_allreduce"] * _ring("allreduce", dp) / dp_bw,
        "dp_reduce_scatter": comm["dp_reduce_scatter"] * _ring("allgather", dp) / dp_bw,
        "dp_allgather": comm["dp_allgather"] * _ring("allgather", dp) / dp_bw,
        "pp_sendrecv": comm["pp_sendrecv"] / 2 / pp_bw,
        "pp_allreduce": comm.get("pp_allreduce", 0) * _ring("allreduce", 2) / pp_bw,
    }
    offload = offload_cost(max(per_stage), dp, w, accum, zero, offload_opt, offload_param,
                           3 if _any_ckpt(cfg) else 2, machine)
    comm_time["offload"] = offload["time_s"]
    recompute_factor = 4 / 3 if _any_ckpt(cfg) else 1.0
    compute = flops * recompute_factor / (world * machine.peak_tflops * 1e12 * machine.compute_efficiency)
    compute /= (1 - bubble)
    step = compute + sum(comm_time.values())
    mfu = flops / (step * world * machine.peak_tflops * 1e12)
    if machine.cpu:
        notes.append("cpu: every byte (offloaded ones too) is process memory; the peak is what plan_check measures: "
                     "anonymous memory under exact malloc (README 'Planning a run')")
    keep = range(world) if rank is None else [rank]
    return Plan(
        task="bart" if encdec else "gpt",
        layout=dict(tp=tp, pp=pp, dp=dp, zero_stage=zero, micro_batch_size=mb, global_batch_size=gbs,
                    micro_batches=accum, precision=prec, checkpointing=_any_ckpt(cfg), offload_optimizer=offload_opt,
                    offload_param=offload_param, world_size=world),
        params=dict(total=int(total), embedding=int(emb_params), per_rank_per_stage=[int(x) for x in per_stage],
                    padded_vocab_size=int(V)),
        bytes_per_rank=dict(per_stage=breakdowns, peak_phase_per_stage=phases, at_peak_per_stage=at_peak, tp_allreduce_per_stage=[int(x) for x in tp_allreduce_stage],
                            activations_per_microbatch_no_ckpt=int(act_nockpt),
                            activations_per_microbatch_ckpt=int(act_ckpt), activations_per_microbatch_per_stage=[
                                int(a) for a in act_stage], in_flight_microbatches=in_flight,
                            bubble_fraction=bubble),
        peak_bytes_per_stage=[int(x) for x in peaks],
        peak_bytes_per_rank=[int(peak_ranks[r]) for r in keep],
        host_bytes_per_rank=[int(host_ranks[r]) for r in keep],
        memory_limit_bytes=limit,
        headroom_bytes=int(limit - worst),
        fits=worst <= limit,
        flops_per_step=int(flops),
        tokens_per_step=int(tokens_step),
        predicted_step_time_s=step,
        predicted_compute_time_s=compute,
        predicted_mfu=mfu,
        comm_bytes_per_rank={k_: int(v) for k_, v in comm.items()},
        comm_time_s=comm_time,
        notes=notes,
        offload=offload,
    )


def offload_cost(P: int, dp: int, w: int, accum: int, zero: int, offload_opt: bool, offload_param: bool,
                 passes: int, machine: Machine) -> Dict[str, float]:
    """What offloading adds to a step of the rank holding ``P`` parameters (``w`` bytes each in the model dtype):

    - ``model.offload_optimizer=cpu`` (ZeRO >= 1): the rank's fp32 gradient partition goes to the host
      (``4 * P/dp`` bytes device -> host), the CPU optimizer updates its ``P/dp`` parameters
      (``machine.cpu_adam_params_per_s``), and the updated partition comes back in the model dtype
      (``w * P/dp`` host -> device);
    - ``model.offload_param=cpu`` (ZeRO 3): the weight partition is fetched from the host before every use:
      ``passes`` (forward, backward, + the recomputation's forward with checkpointing) per micro-batch,
      ``w * P/dp * passes * accum`` host -> device.

    Copies run at ``machine.host_gbps``, not overlapped with compute or with each other (an upper bound: DeepSpeed
    overlaps part of them). On a CPU machine nothing crosses a bus, and the optimizer runs on the host either way:
    no cost. Returns ``{"d2h_bytes", "h2d_bytes", "transfer_time_s", "cpu_optimizer_time_s", "time_s"}``."""
    part = math.ceil(P / dp)
    d2h = h2d = 0
    cpu_params = 0
    if offload_opt and zero >= 1:
        d2h += 4 * part
        h2d += w * part
        cpu_params = part
    if offload_param and zero == 3:
        h2d += w * part * passes * accum
    if machine.cpu:
        return dict(d2h_bytes=0, h2d_bytes=0, transfer_time_s=0.0, cpu_optimizer_time_s=0.0, time_s=0.0)
    transfer = (d2h + h2d) / (machine.host_gbps * 1e9)
    cpu_step = cpu_params / machine.cpu_adam_params_per_s
    return dict(d2h_bytes=int(d2h), h2d_bytes=int(h2d), transfer_time_s=transfer, cpu_optimizer_time_s=cpu_step,
                time_s=transfer + cpu_step)


def _cfg_int(v, default: int) -> int:
    try:
        return int(v) if v is not None and int(v) > 0 else default
    except (TypeError, ValueError):
        return default


def machine_of_run(cfg: DictConfig) -> Machine:
    """The machine a run of ``cfg`` uses here: ``trainer.devices`` x ``trainer.num_nodes`` processes; on CPU
    (``trainer.accelerator=cpu`` or no CUDA) a CPU :class:`Machine` whose limit is this host's memory (what
    ``measure.PeakMemory`` measures is the process's resident set), else the first CUDA device's memory."""
    nodes = _cfg_int(cfg.trainer.get("num_nodes"), 1)
    devices = _cfg_int(cfg.trainer.get("devices"), 0)
    if not devices:  # "auto" / -1: the running process group's size, else one
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else nodes
        devices = max(world // nodes, 1)
    on_cpu = str(cfg.trainer.get("accelerator", "")).lower() == "cpu" or not torch.cuda.is_available()
    if on_cpu:
        host_gb = 0.0
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemTotal:"):
                        host_gb = int(line.split()[1]) * 1024 / GIB
        except OSError:
            host_gb = 0.0
        return Machine(devices_per_node=devices, nodes=nodes, cpu=True, host_memory_gb=host_gb or 1.0)
    mem = torch.cuda.get_device_properties(0).total_memory / GIB
    return Machine(devices_per_node=devices, nodes=nodes, device_memory_gb=mem)


def predicted_for_check(cfg: DictConfig, rank: int, machine: Optional[Machine] = None) -> Dict[str, object]:
    """The plan's prediction for ``rank`` of a run of ``cfg``, in ``planning.check.compare``'s form:
    ``{"peak_bytes": int, "comm_bytes": {kind: bytes per step}}`` with the kinds ``measure.CollectiveCounter``
    names (``<group>_<op>``; ``pp_send`` / ``pp_recv`` and their sum ``pp_sendrecv``); kinds predicted 0 are
    left out. ``machine``: default :func:`machine_of_run` (on CPU: a CPU machine, host memory of the process)."""
    machine = machine or machine_of_run(cfg)
    pl = plan(cfg, machine, rank=rank)
    comm = {k: int(v) for k, v in pl.comm_bytes_per_rank.items() if v}
    pp = int(pl.layout["pp"])
    if "pp_sendrecv" in comm:
        stage = rank // (int(pl.layout["tp"]) * int(pl.layout["dp"]))
        # the plan's pp_sendrecv is the busiest stage's; an end stage sends one way and receives the other
        both = comm["pp_sendrecv"] // (2 if pp > 2 and stage in (0, pp - 1) else 1)
        comm["pp_sendrecv"] = both
        comm["pp_send"] = comm["pp_recv"] = both // 2
    stage = rank // (int(pl.layout["tp"]) * int(pl.layout["dp"]))
    tp_stage = pl.bytes_per_rank["tp_allreduce_per_stage"][stage]
    if tp_stage:
        comm["tp_allreduce"] = int(tp_stage)
    if "pp_allreduce" in comm:
        if stage not in (0, pp - 1):
            del comm["pp_allreduce"]
    return {"peak_bytes": int(pl.peak_bytes_per_rank[0]), "comm_bytes": comm}


def _any_ckpt(cfg) -> bool:
    m = cfg.model
    if is_encoder_decoder(m):
        return any(normalize_checkpoint_granularity(st.activations_checkpoint_granularity) for st in
                   (m.encoder, m.decoder))
    return bool(normalize_checkpoint_granularity(m.activations_checkpoint_granularity))


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(cfg: DictConfig, machine: Machine, top: int = 10, vocab_size: Optional[int] = None,
           stats: Optional[Dict[str, int]] = None) -> List[Plan]:
    """Every layout of ``cfg`` on ``machine`` -- TP (dividing a node: tensor parallelism stays inside a node, as
    Megatron users lay it out), PP, ZeRO stage, micro-batch, activation checkpointing, optimizer / parameter offload;
    DP follows -- that the run's own checks accept (``megatron_ext.config.loader.validate_config``, the same function
    every trainer process calls: head and FFN divisibility by TP, layers per stage, global batch by micro-batch x
    DP, ZeRO >= 2 without PP, ...) and that fits in memory, fastest predicted step first; the first ``top``.
    Sequence parallelism is not implemented in this code base, so it is not searched.

    ``stats`` (a dict, optional) receives ``evaluated`` (layouts planned: accepted by the checks) and ``fits``.
    Speed: one working copy of the config is changed in place per candidate (a fresh deep copy of the composed
    config per candidate was most of the time), and the checks run once per (TP, PP, ZeRO, micro-batch,
    checkpointing): the offload keys do not enter ``validate_config`` (the engine's ``_zero_section`` refuses
    offload below ZeRO 1 / parameter offload below ZeRO 3, which the loop never generates)."""
    machine.check()
    m = cfg.model
    if vocab_size is None:
        vocab_size = int(family_of_config(m).build_tokenizer(m.tokenizer).vocab_size)
    world = machine.world_size
    encdec = is_encoder_decoder(m)
    gbs = int(m.global_batch_size)
    layers = int(m.num_layers) if not encdec else 1
    c = cfg.copy()  # the one working copy; every candidate sets its layout keys on it
    c.trainer.devices, c.trainer.num_nodes = machine.devices_per_node, machine.nodes
    c.trainer.accumulate_grad_batches = None
    ckpt_keys = ["model.encoder.activations_checkpoint_granularity",
                 "model.decoder.activations_checkpoint_granularity"] if encdec else \
        ["model.activations_checkpoint_granularity"]
    plans: List[Plan] = []
    evaluated = 0
    for tp in _divisors(machine.devices_per_node):
        for pp in _divisors(world // tp):
            if pp > layers:
                continue
            dp = world // (tp * pp)
            for zero in (0, 1, 2, 3):
                offloads = [(None, None)] + ([("cpu", None)] if zero >= 1 else []) + \
                    ([("cpu", "cpu")] if zero == 3 else [])
                for mb in _divisors(gbs // dp) if gbs % dp == 0 else []:
                    for ck in (None, "full"):
                        c.model.tensor_model_parallel_size, c.model.pipeline_model_parallel_size = tp, pp
                        c.model.zero_stage, c.model.micro_batch_size = zero, mb
                        c.model.offload_optimizer, c.model.offload_param = None, None
                        for key in ckpt_keys:
                            _set(c, key, ck)
                        try:
                            validate_config(c, world, on_cuda=not machine.cpu)
                        except ConfigError:
                            continue
                        for off_opt, off_par in offloads:
                            c.model.offload_optimizer, c.model.offload_param = off_opt, off_par
                            pl = plan(c, machine, rank=0, vocab_size=vocab_size)
                            evaluated += 1
                            if pl.fits:
                                plans.append(pl)
    plans.sort(key=lambda pl: (pl.predicted_step_time_s, max(pl.peak_bytes_per_stage)))
    if stats is not None:
        stats.update(evaluated=evaluated, fits=len(plans))
    return plans[:top]


def _set(cfg, key: str, value) -> None:
    OmegaConf.update(cfg, key, value, merge=False)
