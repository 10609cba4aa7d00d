"""Restore a .mext archive at TP=2 (torchrun --nproc_per_node 2, gloo, CPU): validation loss and greedy tokens,
then save_to from the TP=2 shards. argv: archive, output archive, results JSON (written by rank 0)."""
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_ext.inference.lm import LM  # noqa: E402
from megatron_ext.inference.runs import validation_loss  # noqa: E402
from megatron_ext.parallel.state import destroy_parallel, initialize_parallel  # noqa: E402


def main(src, dst, out):
    initialize_parallel(2, 1, accelerator="cpu")
    lm = LM.restore_from(src)
    from megatron_ext.modules.common import tp_world_size

    ids = [10, 20, 30]
    with torch.no_grad():
        for _ in range(12):
            logits = lm.model.gather_logits(lm.model(torch.tensor([ids])))
            ids.append(int(logits[0, -1].argmax()))
    loss = validation_loss(lm)
    lm.save_to(dst)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"tp": tp_world_size(), "val_loss": loss, "greedy": ids}, f)
    destroy_parallel()


def pipeline(dst):
    """save_to from a 2-stage pipeline built from the config's init seed (same weights as TP1, any layout)."""
    from megatron_ext.config.loader import load_config
    from megatron_ext.training.gpt_task import GPTTask

    cfg = load_config(overrides=["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                                 "model.seq_length=16", "model.pipeline_model_parallel_size=2"])
    initialize_parallel(1, 2, accelerator="cpu")
    task = GPTTask(cfg, torch.device("cpu"))
    model = task.build_model()
    assert getattr(model, "is_pipeline", False)
    from megatron_ext.checkpoint.archive import save_to

    save_to(model, dst, tokenizer=task.tokenizer, config=cfg)
    destroy_parallel()


if __name__ == "__main__":
    if sys.argv[1] == "--pipeline":
        pipeline(sys.argv[2])
    else:
        main(*sys.argv[1:4])
