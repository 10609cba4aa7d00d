"""Pretrain a GPT (decoder-only) model.

    python pretrain_gpt.py                                   # tiny CPU model on the built-in corpus
    python pretrain_gpt.py +experiment=gpt_125m trainer.accelerator=gpu
    python pretrain_gpt.py --config-path=/my/configs --config-name=my_gpt model.optim.lr=3e-4

Config: configs/gpt/megatron_gpt_config.yaml over the schema in megatron_ext/config/schema.py
(precedence CLI > YAML > dataclass defaults). See README.md.
"""
import os
import sys

import megatron_ext  # noqa: F401  (sets DS_ACCELERATOR=cpu when there is no GPU, before deepspeed loads)

import hydra
from omegaconf import DictConfig

from megatron_ext.config.loader import register_schemas
from megatron_ext.errors import MegatronExtError

register_schemas()


@hydra.main(config_path="configs/gpt", config_name="megatron_gpt_config", version_base=None)
def main(cfg: DictConfig) -> None:
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    try:
        Trainer(cfg, GPTTask).fit()
    except MegatronExtError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
