"""Pretrain a BART-style encoder-decoder (denoising: text infilling) with a transformer or Perceiver encoder.

    python pretrain_bart.py                                   # tiny CPU model on the built-in corpus
    python pretrain_bart.py --config-name=perceiver           # Perceiver encoder (fixed-size latent memory)
    python pretrain_bart.py --config-name=bart_base trainer.accelerator=gpu trainer.precision=bf16 \\
        model.data.data_impl=text_mmap model.data.data_prefix=[1.0,/data/wiki.txt] \\
        model.tokenizer.library=sentencepiece model.tokenizer.model=/data/spm.model

Config: configs/bart/megatron_bart_config.yaml over the schema ``BARTConfig`` in megatron_ext/config/schema.py
(precedence CLI > YAML > dataclass defaults). Shares the trainer, exp manager, checkpoints, logging, launchers
and tensor/data parallelism of pretrain_gpt.py. See README.md.

Exit status: 0 ok; 2 bad input (one line ``error: ...``) or training stopped on a bad step (trainer.nan_policy /
max_consecutive_skips); 3 a collective failed or timed out; 4 a step exceeded trainer.step_timeout_minutes (every
rank's stacks in <run_dir>/stacks/); 75 preempted (SIGTERM / SIGUSR1: a checkpoint of the last step was written;
requeue the job); 130 interrupted.
"""
import sys

import megatron_ext  # noqa: F401  (sets DS_ACCELERATOR=cpu when there is no GPU, before deepspeed loads)

from omegaconf import DictConfig

from megatron_ext.config.loader import hydra_main, register_schemas
from megatron_ext.config.schema import BARTConfig
from megatron_ext.errors import run_entry_point
from megatron_ext.parallel.launch import maybe_self_launch, run_training, strip_launcher_args

register_schemas()


def train(cfg: DictConfig) -> int:
    """Start the workers (trainer.devices > 1 and no launcher) and return their status, or train here (0)."""
    rc = maybe_self_launch(cfg, schema=BARTConfig)
    if rc is not None:
        return rc
    # the training stack (deepspeed, megatron.core, torch.distributed) is imported only once the config is known to
    # be good; the self-launching parent never loads it
    from megatron_ext.training.bart_task import BARTTask  # start-up cost: training stack
    from megatron_ext.training.trainer import Trainer  # start-up cost: training stack

    # 75 (EXIT_REQUEUE): preempted by SIGTERM/SIGUSR1, a checkpoint of the last step written
    return run_training(lambda: Trainer(cfg, BARTTask, schema=BARTConfig).fit(), cfg.trainer.get("dist_timeout_minutes"))


@hydra_main(config_path="configs/bart", config_name="megatron_bart_config")
def main(cfg: DictConfig) -> None:
    rc, status = run_entry_point(None, train, cfg)
    if rc or status:
        sys.exit(rc or status)


if __name__ == "__main__":
    sys.argv = strip_launcher_args(sys.argv)
    main()
