"""Plan a run before launching it: parameters, memory per rank, FLOPs, step time, communication; or search layouts.

    python tools/plan.py +experiment=gpt_7b --devices-per-node 8 --nodes 1 --device-memory-gb 80
    python tools/plan.py --task bart model.seq_length=512 --json
    python tools/plan.py +experiment=gpt_7b --nodes 2 --search --top 10

The positional arguments are exactly the overrides ``pretrain_gpt.py`` (``--task gpt``, default) or
``pretrain_bart.py`` (``--task bart``) take: the same Hydra composition and checks. ``--cpu`` plans a CPU run
(process memory, ``--host-memory-gb``). ``--json`` prints only the JSON object (per-rank peaks under
``peak_bytes_per_rank``). The model and its formulas: ``megatron_ext/planning/planner.py`` and README
"Planning a run".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from megatron_ext.config.loader import check_config, register_schemas
from megatron_ext.config.model_validation import check_model_config
from megatron_ext.config.schema import BARTConfig, GPTConfig
from megatron_ext.planning.compare import compare, compare_table
from megatron_ext.planning.peak import measure_peak_tflops
from megatron_ext.planning.planner import Machine, plan, search

from megatron_ext.errors import ConfigError, run_entry_point

PROG = "plan"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = {"gpt": ("configs/gpt", "megatron_gpt_config"), "bart": ("configs/bart", "megatron_bart_config")}


def compose(task: str, overrides: Sequence[str], target_cuda: bool = True):
    """The checked config ``pretrain_<task>.py OVERRIDES`` would run with on the target machine (``target_cuda``:
    a GPU machine, whatever this one has: the device-dependent model checks are run for the target)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException


    register_schemas()
    path, name = TASKS[task]
    try:
        with initialize_config_dir(config_dir=os.path.join(REPO, path), version_base=None):
            cfg = hydra_compose(config_name=name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"overrides {' '.join(overrides)}: {str(e).splitlines()[0]}") from None
    import torch
    from omegaconf import open_dict

    with open_dict(cfg):  # this machine checks the run as the target's: trainer.accelerator of the target
        cfg.trainer.accelerator = "gpu" if target_cuda and torch.cuda.is_available() else "cpu"
    cfg = check_config(cfg, BARTConfig if task == "bart" else GPTConfig)
    check_model_config(cfg.model, use_cuda=target_cuda)
    return cfg


def _gb(x: float) -> str:
    return f"{x / 2 ** 30:.2f} GiB"


def table(pl) -> str:
    lay = pl.layout
    rows = [
        ("layout", f"TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']}, ZeRO {lay['zero_stage']}, micro-batch "
                   f"{lay['micro_batch_size']} x {lay['micro_batches']}, {lay['precision']}, checkpointing "
                   f"{'on' if lay['checkpointing'] else 'off'}, offload opt/param {lay['offload_optimizer']}/"
                   f"{lay['offload_param']}"),
        ("parameters", f"{pl.params['total']:,} (embedding {pl.params['embedding']:,}; per rank by stage "
                       f"{', '.join(f'{x:,}' for x in pl.params['per_rank_per_stage'])})"),
    ]
    for i, parts in enumerate(pl.bytes_per_rank["per_stage"]):
        rows.append((f"stage {i} bytes/rank", ", ".join(f"{k} {_gb(v)}" for k, v in parts.items())))
    rows += [
        ("activations / micro-batch", f"no ckpt {_gb(pl.bytes_per_rank['activations_per_microbatch_no_ckpt'])}, "
                                      f"ckpt {_gb(pl.bytes_per_rank['activations_per_microbatch_ckpt'])}"),
        ("pipeline", f"in flight {pl.bytes_per_rank['in_flight_microbatches']}, bubble "
                     f"{pl.bytes_per_rank['bubble_fraction']:.1%}"),
        ("peak per stage", ", ".join(_gb(x) for x in pl.peak_bytes_per_stage)),
    ]
    for i, (at, phase) in enumerate(zip(pl.bytes_per_rank["at_peak_per_stage"],
                                        pl.bytes_per_rank["peak_phase_per_stage"])):
        rows.append((f"stage {i} peak made of", f"at the {phase}: " + ", ".join(
            f"{k} {_gb(v)}" for k, v in at.items() if v)))
    rows += [
        ("limit / headroom", f"{_gb(pl.memory_limit_bytes)} / {_gb(pl.headroom_bytes)} "
                             f"({'fits' if pl.fits else 'DOES NOT FIT'})"),
        ("FLOPs / step", f"{pl.flops_per_step:.3e} over {pl.tokens_per_step:,} tokens"),
        ("step time", f"{pl.predicted_step_time_s:.3f} s (compute {pl.predicted_compute_time_s:.3f} s), MFU "
                      f"{pl.predicted_mfu:.1%}"),
    ]
    for kind, b in pl.comm_bytes_per_rank.items():
        if b:
            rows.append((f"comm {kind}", f"{_gb(b)} / step, {pl.comm_time_s[kind]:.3f} s"))
    off = getattr(pl, "offload", None) or {}
    if off.get("time_s"):
        rows.append(("offload", f"{_gb(off['d2h_bytes'])} to host + {_gb(off['h2d_bytes'])} back / step, "
                                f"{off['transfer_time_s']:.3f} s copies + {off['cpu_optimizer_time_s']:.3f} s CPU "
                                f"optimizer"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


DEFAULT_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16


def _check_peak_args(args) -> None:
    if args.measure_peak and args.peak_tflops is not None:
        raise ConfigError(f"--measure-peak and --peak-tflops {args.peak_tflops:g} are both given: --measure-peak "
                          f"measures the peak on this machine, --peak-tflops sets it; give one of them")


def peak_tflops(args) -> float:
    """``--peak-tflops``, or what ``--measure-peak`` measured on this machine (printed; on stderr with --json)."""
    _check_peak_args(args)
    if not args.measure_peak:
        return DEFAULT_PEAK_TFLOPS if args.peak_tflops is None else float(args.peak_tflops)
    got = measure_peak_tflops()
    print(f"--measure-peak: {got['tflops']:.3f} TFLOP/s ({got['dtype']} {got['n']}x{got['n']} matmul on "
          f"{got['device']}, {got['iters']} in {got['seconds']:.2f} s) used as the peak",
          file=sys.stderr if args.json else sys.stdout)
    return float(got["tflops"])


def run(args) -> None:
    _check_peak_args(args)
    if args.cpu and not args.host_memory_gb > 0:
        raise ConfigError("--cpu needs --host-memory-gb > 0 (the memory the process may use)")
    if args.compare and args.search:
        raise ConfigError("--compare and --search are both given: --compare explains one layout, --search ranks "
                          "layouts; give one of them")
    overrides = list(args.overrides) + [f"trainer.devices={args.devices_per_node}", f"trainer.num_nodes={args.nodes}"]
    cfg = compose(args.task, overrides, target_cuda=not args.cpu)
    machine = Machine(devices_per_node=args.devices_per_node, nodes=args.nodes,
                      device_memory_gb=args.device_memory_gb, peak_tflops=peak_tflops(args),
                      intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
                      compute_efficiency=args.compute_efficiency, cpu=args.cpu, host_memory_gb=args.host_memory_gb,
                      host_gbps=args.host_gbps, cpu_adam_params_per_s=args.cpu_adam_params_per_s)
    if args.search:
        stats: dict = {}
        plans = search(cfg, machine, top=args.top, vocab_size=args.vocab_size, stats=stats)
        if args.json:
            print(json.dumps([p.to_dict() for p in plans], sort_keys=True))
            return
        print(f"{stats['evaluated']} layouts evaluated, {stats['fits']} fit; the fastest {len(plans)}:")
        if not plans:
            print("no layout fits")
        for i, pl in enumerate(plans, 1):
            lay = pl.layout
            print(f"{i:>3}. {pl.predicted_step_time_s:9.3f} s  peak {_gb(max(pl.peak_bytes_per_stage)):>12}  "
                  f"TP {lay['tp']} PP {lay['pp']} DP {lay['dp']} ZeRO {lay['zero_stage']} mb "
                  f"{lay['micro_batch_size']} ckpt {'on' if lay['checkpointing'] else 'off'} offload "
                  f"{'opt' if lay['offload_optimizer'] else '-'}/{'param' if lay['offload_param'] else '-'}")
        return
    pl = plan(cfg, machine, vocab_size=args.vocab_size)
    if args.compare:

        c = compare(pl, cfg, machine)
        print(json.dumps(c, sort_keys=True) if args.json else compare_table(c))
        return
    print(pl.to_json() if args.json else table(pl))


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="the entry point's overrides (e.g. +experiment=gpt_7b model.zero_stage=3)")
    ap.add_argument("--task", choices=sorted(TASKS), default="gpt", help="pretrain_gpt.py (gpt) or pretrain_bart.py")
    ap.add_argument("--devices-per-node", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--device-memory-gb", type=float, default=80.0, help="GiB of memory per device")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"dense peak TFLOP/s of one device (default {DEFAULT_PEAK_TFLOPS:g}: H100 bf16)")
    ap.add_argument("--measure-peak", action="store_true",
                    help="measure this machine's matmul rate (bf16 on CUDA, fp32 on CPU, ~2 s) and use it as the peak")
    ap.add_argument("--compute-efficiency", type=float, default=0.5, help="fraction of the peak the matmuls reach")
    ap.add_argument("--intra-node-gbps", type=float, default=300.0, help="GB/s between devices of a node")
    ap.add_argument("--inter-node-gbps", type=float, default=25.0, help="GB/s per device across nodes")
    ap.add_argument("--host-gbps", type=float, default=25.0,
                    help="GB/s between a device and host memory, for offload (PCIe gen4 x16: 25)")
    ap.add_argument("--cpu-adam-params-per-s", type=float, default=5e8,
                    help="parameters / s one rank's CPU optimizer step updates under offload_optimizer (5e8)")
    ap.add_argument("--compare", action="store_true",
                    help="per-rank bytes beside DeepSpeed's estimator and Megatron-LM's formulas (GPT)")
    ap.add_argument("--cpu", action="store_true", help="a CPU run: every byte is process memory")
    ap.add_argument("--host-memory-gb", type=float, default=0.0, help="--cpu: GiB the process may use")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the tokenizer's (model.tokenizer)")
    ap.add_argument("--search", action="store_true", help="rank every valid layout that fits")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    return run_entry_point(PROG, run, ap.parse_intermixed_args(argv))[0]  # overrides may follow options


if __name__ == "__main__":
    sys.exit(main())
