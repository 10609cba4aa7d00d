"""Pretrain a GPT (decoder-only) model.

    python pretrain_gpt.py                                   # tiny CPU model on the built-in corpus
    python pretrain_gpt.py +experiment=gpt_125m trainer.accelerator=gpu
    python pretrain_gpt.py --config-path=/my/configs --config-name=my_gpt model.optim.lr=3e-4
    python pretrain_gpt.py trainer.devices=2                 # starts 2 processes itself (no launcher needed)
    python pretrain_gpt.py +experiment=copy_task             # a synthetic task (megatron_ext/data/synthetic.py)
    python pretrain_gpt.py -m model.hidden_size=128,256 model.optim.lr=1e-3,3e-4   # 4 runs, one directory each
    NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh trainer.max_steps=1000   # see launch/

Config: configs/gpt/megatron_gpt_config.yaml over the schema in megatron_ext/config/schema.py
(precedence CLI > YAML > dataclass defaults). See README.md.

Exit status: 0 ok; 2 bad input (one line ``error: ...``, or Hydra's message for its own config errors), or training
stopped on a bad step (a non-finite loss or spike, trainer.nan_policy / max_consecutive_skips); 3 a collective failed
or timed out (one line ``error: rank R: ...``: another rank died or hung); 4 a step exceeded
trainer.step_timeout_minutes (one line ``error: step N exceeded ...`` naming the ranks that waited in a collective and
those that did not; every rank's stacks in <run_dir>/stacks/); 75 preempted (SIGTERM or SIGUSR1 to any rank or to the
self-launching parent: every rank stopped after the same step, a checkpoint of it was written; requeue the job, it
resumes from there); 130 interrupted (Ctrl-C).
"""
import sys

import megatron_ext  # noqa: F401  (sets DS_ACCELERATOR=cpu when there is no GPU, before deepspeed loads)

from omegaconf import DictConfig

from megatron_ext.config.loader import hydra_main, register_schemas
from megatron_ext.errors import run_entry_point
from megatron_ext.parallel.launch import maybe_self_launch, run_training, strip_launcher_args
from megatron_ext.training.exp_manager import check_sweep_launch

register_schemas()


def train(cfg: DictConfig) -> int:
    """Start the workers (trainer.devices > 1 and no launcher) and return their status, or train here (0)."""
    check_sweep_launch(cfg)  # -m: each job has its own run directory (exp_manager.resolve_run_dir)
    # the whole config is checked first (schema, architecture, world size: a bad one exits 2 here, before any
    # process, process group or the training stack); then trainer.devices > 1 without a launcher starts the
    # workers and waits for them
    rc = maybe_self_launch(cfg)
    if rc is not None:
        return rc
    # the training stack (deepspeed, megatron.core, torch.distributed) is imported only once the config is known to
    # be good; the self-launching parent never loads it
    from megatron_ext.training.gpt_task import GPTTask  # start-up cost: training stack
    from megatron_ext.training.trainer import Trainer  # start-up cost: training stack

    # 75 (EXIT_REQUEUE): preempted by SIGTERM/SIGUSR1, a checkpoint of the last step written
    return run_training(lambda: Trainer(cfg, GPTTask).fit(), cfg.trainer.get("dist_timeout_minutes"))


@hydra_main(config_path="configs/gpt", config_name="megatron_gpt_config")
def main(cfg: DictConfig) -> None:
    rc, status = run_entry_point(None, train, cfg)
    if rc or status:
        sys.exit(rc or status)  # (0: no sys.exit(0), a -m sweep goes on with its next job)


if __name__ == "__main__":
    sys.argv = strip_launcher_args(sys.argv)  # the deepspeed launcher appends --local_rank=N
    main()
