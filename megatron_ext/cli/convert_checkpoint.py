"""Convert GPT checkpoints between parallel layouts.

Consolidate a checkpoint saved under any TP x PP x DP layout (ZeRO 0-3) into one fp32 state dict::

    python tools/convert_checkpoint.py --input experiments/megatron_gpt/v1/checkpoints/step_0000500 \\
        --output gpt_step500.pt

Any layout loads that file as weights (``model.ckpt_path=gpt_step500.pt``: fine-tuning, evaluation with
``trainer.limit_train_batches=0``, or a restart). To continue *training* under a new layout, write a checkpoint
directory for it (runs ``target_tp * target_pp * target_dp`` CPU processes; weights are carried exactly, the LR
schedule continues from the saved step, the optimizer moments restart from zero)::

    python tools/convert_checkpoint.py --input gpt_step500.pt --target-tp 1 --target-pp 1 \\
        --output-dir experiments/megatron_gpt/tp1
    python pretrain_gpt.py model.tensor_model_parallel_size=1 model.pipeline_model_parallel_size=1 \\
        exp_manager.exp_dir=experiments exp_manager.name=megatron_gpt exp_manager.version=tp1 \\
        exp_manager.resume_if_exists=true ...

``--input`` is a checkpoint directory (``step_N``, a ``checkpoints`` directory or a run directory: its latest)
or a consolidated ``.pt`` file. A checkpoint directory is verified against its manifest first (a corrupt, truncated,
missing or added file is refused, naming it); the directories ``--output-dir`` writes carry a manifest like any
training checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from megatron_ext.checkpoint.consolidated import consolidate_checkpoint, read_consolidated
from megatron_ext.errors import MegatronExtError
from megatron_ext.output_files import check_outputs


def _consolidated_from(input_path: str):
    if os.path.isfile(input_path):
        return read_consolidated(input_path)
    return consolidate_checkpoint(input_path)


def _worker(rank: int, world: int, port: int, consolidated_path: str, out_dir: str, tp: int, pp: int,
            zero_stage: int, devices_env: dict) -> None:
    os.environ.update(devices_env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    from omegaconf import OmegaConf

    from megatron_ext.config.loader import load_config  # start-up cost: model stack
    from megatron_ext.training.checkpointing import Checkpointer  # start-up cost: model stack
    from megatron_ext.checkpoint.consolidated import read_consolidated  # start-up cost: model stack
    from megatron_ext.training.gpt_task import GPTTask  # start-up cost: model stack
    from megatron_ext.training.trainer import Trainer  # start-up cost: model stack

    torch.set_num_threads(1)
    obj = read_consolidated(consolidated_path)
    out_dir = os.path.abspath(out_dir)
    cfg = load_config()
    model_cfg = dict(obj["model_config"])
    cfg.model = OmegaConf.merge(cfg.model, model_cfg)
    cfg.model.tensor_model_parallel_size = tp
    cfg.model.pipeline_model_parallel_size = pp
    cfg.model.zero_stage = zero_stage
    cfg.model.deepspeed_config = None
    cfg.model.sequence_parallel = False
    cfg.model.ckpt_path = consolidated_path
    cfg.trainer.devices = world
    cfg.trainer.num_nodes = 1
    cfg.trainer.accelerator = "cpu"
    cfg.trainer.precision = obj["source"].get("precision", "32") if obj["source"].get("precision") != "16" else "32"
    cfg.exp_manager.exp_dir = os.path.dirname(os.path.dirname(out_dir))
    cfg.exp_manager.name = os.path.basename(os.path.dirname(out_dir))
    cfg.exp_manager.version = os.path.basename(out_dir)
    cfg.exp_manager.create_tensorboard_logger = False
    cfg.exp_manager.create_wandb_logger = False
    # the data position and batch sizes of the source run are kept; the global batch must suit the new layout
    trainer = Trainer(cfg, GPTTask)
    trainer._loaded_step = 0
    trainer._build()
    step = int(obj.get("step", 0))
    if trainer.scheduler is not None:
        import warnings

        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
            warnings.simplefilter("ignore")
            for _ in range(step):  # continue the LR schedule where the source run stopped
                trainer.scheduler.step()
    consumed = int(obj.get("consumed_samples", 0))
    trainer.cfg.model.ckpt_path = None  # the temporary source file is no part of the written checkpoint's config
    keep = cfg.exp_manager.checkpoint_callback_params.save_layout_free  # then any other layout loads it too
    Checkpointer(trainer.exp.ckpt_dir).save(trainer.engine, step, consumed, trainer._rng_states(), trainer._meta(),
                                            layout_free=trainer._save_layout_free(step, consumed) if keep else None)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def write_layout_checkpoint(consolidated_path: str, out_dir: str, tp: int, pp: int, dp: int = 1,
                            zero_stage: int = 0) -> None:
    """Write a checkpoint of the consolidated file's weights for the ``tp x pp x dp`` layout into the run directory
    ``out_dir`` (``out_dir/checkpoints/step_N``, ``out_dir/config.yaml``): ``tp * pp * dp`` CPU processes (gloo),
    each building its part of the model as training does."""
    import socket

    import torch.multiprocessing as mp

    world = tp * pp * dp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    mp.start_processes(_worker, args=(world, port, os.path.abspath(consolidated_path), out_dir, tp, pp, zero_stage,
                                      env), nprocs=world, join=True, start_method="spawn")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="checkpoint directory or consolidated .pt file")
    ap.add_argument("--output", help="write the consolidated fp32 state dict here (.pt)")
    ap.add_argument("--output-dir", help="write a checkpoint for --target-tp/--target-pp here (a run directory)")
    ap.add_argument("--target-tp", type=int, default=1)
    ap.add_argument("--target-pp", type=int, default=1)
    ap.add_argument("--target-dp", type=int, default=1, help="data-parallel size of the new layout (default 1)")
    ap.add_argument("--target-zero-stage", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing --output file / write into a non-empty --output-dir")
    args = ap.parse_args(argv)
    if not args.output and not args.output_dir:
        ap.error("give --output (consolidated .pt) and/or --output-dir (checkpoint for a new layout)")
    try:
        if not os.path.exists(args.input):
            raise MegatronExtError(f"--input {args.input}: no such file or directory")
        for k in ("target_tp", "target_pp", "target_dp"):
            if getattr(args, k) < 1:
                raise MegatronExtError(f"--{k.replace('_', '-')}={getattr(args, k)}: expected an integer >= 1")

        outputs = [("--output", args.output)] if args.output else []
        if args.output_dir:
            outputs.append(("--output-dir", os.path.join(args.output_dir, "")))
        check_outputs(outputs, [args.input], overwrite=args.overwrite)
        from megatron_ext.checkpoint.consolidated import save_consolidated  # start-up cost: model stack

        obj = _consolidated_from(args.input)
        src = obj["source"]
        n = sum(t.numel() for t in obj["state_dict"].values())
        if args.output:
            save_consolidated(obj, args.output)
            print(f"consolidated {src.get('path', args.input)} (tp {src.get('tp')}, pp {src.get('pp')}, ZeRO "
                  f"{src.get('zero_stage')}, step {obj['step']}): {len(obj['state_dict'])} tensors, {n / 1e6:.2f}M "
                  f"parameters -> {args.output}")
        if args.output_dir:
            with tempfile.TemporaryDirectory() as tmp:
                path = args.output if args.output else os.path.join(tmp, "consolidated.pt")
                if not args.output:
                    save_consolidated(obj, path)
                write_layout_checkpoint(path, args.output_dir, args.target_tp, args.target_pp, args.target_dp,
                                        args.target_zero_stage)
            print(f"wrote a tp {args.target_tp} x pp {args.target_pp} x dp {args.target_dp} checkpoint (step "
                  f"{obj['step']}) to {os.path.join(args.output_dir, 'checkpoints')}")
    except MegatronExtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
