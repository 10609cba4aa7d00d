"""Planning a run: predicted memory, time and communication (``planner``) and their measured ground truth
(``measure``: collective bytes and peak memory; ``check``: the trainer's ``trainer.plan_check``)."""
