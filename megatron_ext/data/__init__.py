"""Datasets and data loading.

* :mod:`.default_corpus` -- the built-in English corpus (stdlib help topics + docstrings);
* :mod:`.gpt_data` -- GPT train/valid/test datasets over Megatron ``.bin``/``.idx`` (blends, splits,
  sample-index cache that also works on node-local disks);
* :mod:`.bart` -- BART denoising datasets (samples, blends, builder), over :mod:`.bart_noising` (text
  infilling, sentence permutation) and :mod:`.documents` (``.bin``/``.idx``, text and JSONL document sources);
* :mod:`.prefixes` -- ``model.data.data_prefix`` / ``splits_string`` parsing shared by GPT and BART data;
* :mod:`.collective` -- a user error on one rank raised on every rank while the data is prepared;
* :mod:`.validation` -- one clear ``DataError`` for every bad data file;
* :mod:`.samplers` -- resumable, deterministic pretraining data loader and sample counts;
* :mod:`.synthetic` -- synthetic tasks (copy, reverse, sort, histogram, registered ones) for ``model.data.task``.
"""
from megatron_ext.data.default_corpus import ensure_default_corpus
from megatron_ext.data.gpt_data import build_gpt_datasets, parse_data_prefix
from megatron_ext.data.samplers import build_pretraining_dataloader, compute_num_samples
from megatron_ext.data.synthetic import SYNTHETIC_TASKS, build_synthetic_datasets, register_task
from megatron_ext.data.validation import validate_indexed_dataset

__all__ = [
    "SYNTHETIC_TASKS",
    "build_gpt_datasets",
    "build_pretraining_dataloader",
    "build_synthetic_datasets",
    "compute_num_samples",
    "ensure_default_corpus",
    "parse_data_prefix",
    "register_task",
    "validate_indexed_dataset",
]
