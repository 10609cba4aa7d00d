"""GPT datasets over a raw text file built by two ranks (gloo): the same samples on both, and those of the
preprocessed file, with a shared cache (built once, by rank 0) and with node-local caches (one per rank)."""
from __future__ import annotations

import glob
import os
import subprocess

import numpy as np
import pytest

import helpers
from helpers import REPO, free_port
from megatron_ext.cli import preprocess_data as pp
from megatron_ext.config.schema import DataConfig
from megatron_ext.data.gpt_data import build_gpt_datasets
from megatron_ext.tokenizers import build_tokenizer

WORKER = r"""
import logging, sys
logging.basicConfig(level=logging.INFO)
import numpy as np, torch.distributed as dist
from megatron_ext.config.schema import DataConfig
from megatron_ext.data.gpt_text import build_gpt_text_datasets
from megatron_ext.tokenizers import build_tokenizer
path, cache_pattern, out = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = DataConfig(data_prefix=[path], data_impl="text_mmap", index_mapping_dir=cache_pattern.format(rank=rank),
                 splits_string="8,2,0")
train, valid, test = build_gpt_text_datasets(cfg, build_tokenizer("byte"), 16, (24, 6, 0), seed=9)
assert test is None
np.save(out.format(rank=rank), np.stack([train[i]["tokens"].numpy() for i in range(24)]
                                       + [valid[i]["tokens"].numpy() for i in range(6)]))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.parametrize("shared", [True, False], ids=["shared-cache", "node-local-caches"])
def test_two_ranks_see_the_preprocessed_samples(tmp_path, shared):
    path = tmp_path / "t.txt"
    path.write_text("".join(f"document {i}: " + "abc " * (i % 11) + "\n" for i in range(200)), encoding="utf-8")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    cache = str(tmp_path / ("cache" if shared else "cache{rank}"))  # node-local disks: one directory per rank
    out = str(tmp_path / "out{rank}.npy")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([helpers.PYTHON, str(script), str(path), cache, out],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    a, b = (np.load(out.format(rank=r)) for r in range(2))
    assert np.array_equal(a, b)

    assert pp.main(["--input", str(path), "--output-prefix", str(tmp_path / "pre"), "--append-eod", "--workers", "1",
                    "--no-progress"]) == 0
    cfg = DataConfig(data_prefix=[str(tmp_path / "pre_text_document")], index_mapping_dir=str(tmp_path / "ref"),
                     splits_string="8,2,0")
    train, valid, _ = build_gpt_datasets(cfg, build_tokenizer("byte"), 16, (24, 6, 0), seed=9)
    ref = np.stack([train[i]["tokens"].numpy() for i in range(24)] + [valid[i]["tokens"].numpy() for i in range(6)])
    assert np.array_equal(a, ref)

    # the token counts: written once per cache directory (never twice into one), no temporary files left
    for d in ([cache] if shared else [cache.format(rank=r) for r in range(2)]):
        assert len(glob.glob(os.path.join(d, "**", "t.txt.gptdocs-*.json"), recursive=True)) == 1, d
        assert not glob.glob(os.path.join(d, "**", ".tmp-*"), recursive=True), d
    logs = "\n".join(logs)
    assert logs.count("counting their tokens") == (1 if shared else 2), logs[-3000:]
