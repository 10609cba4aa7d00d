"""Test helper run by tests/integration/test_reshard.py (one process per rank, under torchrun for a world > 1).

    python tests/integration/reshard_hop.py OUT [--train] OVERRIDES...
        resume the run the overrides name (``exp_manager.resume_if_exists=true``) under the layout they give -- the
        trainer's own restore -- and write the state it loaded, untouched, as a checkpoint of the same step into
        OUT (a ``checkpoints`` directory); its ``layout_free`` tensors are the loaded state gathered again. With
        ``--train`` the run then trains on to ``trainer.max_steps`` as ``Trainer.fit`` does (one launch checks
        both the loaded state and the losses after it).
    python tests/integration/reshard_hop.py --many LIST OVERRIDES...
        one engine of the layout the overrides give loads, in turn, each checkpoint LIST names (a line
        ``SRC_CHECKPOINTS_DIR OUT``: its latest, through the trainer's full-state load ``Trainer._resume``) and
        writes what it loaded into OUT, as above: many round trips back into one layout for one launch.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import helpers  # noqa: E402
import megatron_ext  # noqa: E402,F401


def main(out: str, train: bool, overrides) -> None:
    from megatron_ext.training.checkpointing import Checkpointer
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(helpers.compose_entry_config(overrides), GPTTask)
    trainer._loaded_step = 0
    try:
        datasets = trainer.task.build_datasets(trainer._num_samples()) if train else None
        trainer._build()
        step, consumed = trainer._restore()
        assert step > 0, "nothing was resumed"
        trainer._save(Checkpointer(out), step, consumed, None)
        if train:  # the rest of Trainer.fit
            trainer.exp.start(resumed_step=step)
            trainer._train_loop(datasets[0], datasets[1], step, consumed)
    finally:
        trainer.exp.close()


def many(listing: str, overrides) -> None:
    from megatron_ext.checkpoint.files import find_latest
    from megatron_ext.training.checkpointing import Checkpointer
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    trainer = Trainer(helpers.compose_entry_config(overrides), GPTTask)
    try:
        trainer._build()
        for line in open(listing).read().splitlines():
            src, out = line.split()
            step, consumed = trainer._resume(src, find_latest(src))
            assert step > 0, f"nothing was loaded from {src}"
            trainer._save(Checkpointer(out), step, consumed, None)
    finally:
        trainer.exp.close()


if __name__ == "__main__":
    if sys.argv[1] == "--many":
        many(sys.argv[2], sys.argv[3:])
    else:
        train = sys.argv[2:3] == ["--train"]
        main(sys.argv[1], train, sys.argv[3:] if train else sys.argv[2:])
