"""Planning a run before launching it: memory, time and communication per rank (``planner``) and a layout
search. See README "Planning a run"."""
