"""Planning a run before launching it: predicted memory, time and communication per rank and a layout search
(``planner``), and their measured ground truth (``measure``: collective bytes and peak memory; ``check``: the
trainer's ``trainer.plan_check``). See README "Planning a run"."""
