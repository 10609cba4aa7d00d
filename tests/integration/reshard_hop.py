"""Test helper run by tests/integration/test_reshard.py (one process per rank, under torchrun for a world > 1):
resume the run the overrides name (``exp_manager.resume_if_exists=true``) under the layout they give -- the
trainer's own restore -- and write the state it loaded, untouched, as a checkpoint of the same step into OUT
(a ``checkpoints`` directory). Its ``layout_free`` tensors are the loaded state gathered again.

    python tests/integration/reshard_hop.py OUT OVERRIDES...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import helpers  # noqa: E402
import megatron_ext  # noqa: E402,F401


def main(out: str, overrides) -> None:
    from megatron_ext.training.checkpointing import Checkpointer
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(helpers.compose_entry_config(overrides), GPTTask)
    try:
        trainer._build()
        step, consumed = trainer._restore()
        assert step > 0, "nothing was resumed"
        trainer._save(Checkpointer(out), step, consumed, None)
    finally:
        trainer.exp.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
