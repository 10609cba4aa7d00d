"""What the layout-free state (megatron_ext/checkpoint/reshard.py) costs a checkpoint, measured in one process:
the time of DeepSpeed's own save (model, optimizer, scheduler files) and of the layout-free save and load of the
same state, and the bytes each writes. One JSON line per figure; the median of ``--repeats`` saves.

    python bench/bench_reshard.py            # 6 layers, hidden 512 (about 25M parameters), fp32, ZeRO 0
    python bench/bench_reshard.py --quick    # 2 layers, hidden 64
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megatron_ext  # noqa: E402,F401  (DS_ACCELERATOR=cpu without a GPU)


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--zero-stage", type=int, default=0)
    args = ap.parse_args()
    layers, hidden = (2, 64) if args.quick else (6, 512)
    from hydra import compose, initialize_config_dir

    from megatron_ext.checkpoint import reshard
    from megatron_ext.config.loader import register_schemas
    from megatron_ext.training.gpt_task import GPTTask
    from megatron_ext.training.trainer import Trainer

    work = tempfile.mkdtemp(prefix="bench_reshard_")
    register_schemas()
    overrides = ["+experiment=cpu_smoke", f"model.num_layers={layers}", f"model.hidden_size={hidden}",
                 "model.num_attention_heads=8", "model.seq_length=64", "trainer.max_steps=1",
                 f"model.zero_stage={args.zero_stage}", f"exp_manager.exp_dir={work}",
                 "exp_manager.create_tensorboard_logger=false", "trainer.val_check_interval=0"]
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "gpt")
    with initialize_config_dir(config_dir=root, version_base=None):
        cfg = compose(config_name="megatron_gpt_config", overrides=overrides)
    trainer = Trainer(cfg, GPTTask)
    try:
        train_ds, _, _ = trainer.task.build_datasets(trainer._num_samples())
        trainer._build()
        trainer._train_step(trainer._iter(train_ds, 0), False)  # the optimizer state exists after a step
        engine, kw = trainer.engine, trainer._reshard_kw()
        n_params = sum(p.numel() for p in engine.module.parameters())
        ds_t, lf_t, ld_t = [], [], []
        for i in range(args.repeats):
            d = os.path.join(work, f"c{i}")
            t0 = time.perf_counter()
            engine.save_checkpoint(d, tag="s", save_latest=False)
            ds_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reshard.save_state(engine, os.path.join(d, "s"), scheduler=trainer.scheduler, extra={}, **kw)
            lf_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reshard.load_state(engine, os.path.join(d, "s"), pipeline=kw["pipeline"], num_layers=kw["num_layers"])
            ld_t.append(time.perf_counter() - t0)
        step_dir = os.path.join(work, "c0", "s")
        lf_bytes = _size(os.path.join(step_dir, reshard.STATE_DIR))
        ds_bytes = _size(step_dir) - lf_bytes
    finally:
        trainer.exp.close()
        shutil.rmtree(work, ignore_errors=True)
    config = {"layers": layers, "hidden": hidden, "params": n_params, "zero_stage": args.zero_stage,
              "precision": "32", "processes": 1, "repeats": args.repeats}
    for metric, value, unit in (("deepspeed_save_s", statistics.median(ds_t), "s"),
                                ("layout_free_save_s", statistics.median(lf_t), "s"),
                                ("layout_free_load_s", statistics.median(ld_t), "s"),
                                ("deepspeed_bytes", ds_bytes, "bytes"),
                                ("layout_free_bytes", lf_bytes, "bytes")):
        print(json.dumps({"bench": "reshard", "metric": metric,
                          "value": round(value, 4) if unit == "s" else value, "unit": unit, "config": config}),
              flush=True)


if __name__ == "__main__":
    main()
