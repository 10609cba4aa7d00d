"""Datasets built by two ranks (torchrun, gloo): the same samples on both, with a shared or a node-local cache."""
from __future__ import annotations

import glob
import os
import subprocess

import numpy as np
import pytest

import helpers
from helpers import REPO, marker_docs, write_dataset
from megatron_ext.config.schema import DataConfig
from megatron_ext.data.gpt_data import build_gpt_datasets
from megatron_ext.tokenizers import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("byte")


# ----------------------------------------------------------------------------- multi-process
WORKER = r"""
import os, sys, json
import numpy as np, torch, torch.distributed as dist
from megatron_ext.config.schema import DataConfig
from megatron_ext.data.gpt_data import build_gpt_datasets
from megatron_ext.tokenizers import build_tokenizer
prefix, cache_pattern, out = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = DataConfig(data_prefix=[prefix], index_mapping_dir=cache_pattern.format(rank=rank), splits_string="8,2,0")
train, valid, _ = build_gpt_datasets(cfg, build_tokenizer("byte"), 16, (24, 6, 0), seed=9)
np.save(out.format(rank=rank), np.stack([train[i]["tokens"].numpy() for i in range(24)]
                                       + [valid[i]["tokens"].numpy() for i in range(6)]))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.parametrize("shared", [True, False], ids=["shared-cache", "node-local-caches"])
def test_two_ranks_build_same_datasets(tmp_path, tok, shared):
    from helpers import free_port

    prefix = write_dataset(str(tmp_path / "d"), marker_docs(tok, 50))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # node-local disks are simulated by one cache directory per rank (rank 1 cannot see rank 0's)
    cache = str(tmp_path / ("cache" if shared else "cache{rank}"))
    out = str(tmp_path / "out{rank}.npy")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen([helpers.PYTHON, str(script), prefix, cache, out],
                         env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)

    ref_train, ref_valid, _ = build_gpt_datasets(
        DataConfig(data_prefix=[prefix], index_mapping_dir=str(tmp_path / "ref"), splits_string="8,2,0"),
        tok, 16, (24, 6, 0), seed=9)
    ref = np.stack([ref_train[i]["tokens"].numpy() for i in range(24)] + [ref_valid[i]["tokens"].numpy() for i in range(6)])
    for r in range(2):
        assert np.array_equal(np.load(out.format(rank=r)), ref)
    for r in range(2):
        assert len(glob.glob(os.path.join(cache.format(rank=r), "*.npy"))) == 6
