"""Resumable, deterministic data loading for pretraining.

The datasets from :func:`megatron_ext.data.gpt_data.build_gpt_datasets` are already shuffled
(megatron-core's shuffle index), so the sampler walks them *in order*:

* micro-step ``t`` (counting from ``consumed_samples``) covers the global micro-batch of
  samples ``[c + t*G, c + (t+1)*G)`` with ``G = micro_batch_size * dp_size``;
* data-parallel rank ``r`` takes the contiguous slice ``[r*m, (r+1)*m)`` of it (``m`` =
  ``micro_batch_size``).

Sample ``i`` of the run is therefore a pure function of ``i``: resuming with
``consumed_samples=k`` yields exactly the batches an uninterrupted run yields after it had
consumed ``k`` samples, for any ``num_workers``. ``consumed_samples`` counts samples over all
data-parallel ranks (``global_batch_size`` per optimizer step); it need not be a multiple of
``G`` (e.g. when resuming with another data-parallel size).

Past the end of the dataset the sampler *wraps around* (index ``i % len(dataset)``), i.e. it
starts another pass in the same order. Datasets built with
:func:`compute_num_samples` are long enough that training never wraps; validation may, by
design (it re-reads the same validation samples). Pass ``total_samples`` to stop instead.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Sampler

from megatron_ext.errors import ConfigError, DataError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
_DTYPES = {"tokens": torch.long, "labels": torch.long, "loss_mask": torch.float32, "position_ids": torch.long}


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r}: expected an integer >= {minimum}")
    return value


class PretrainingBatchSampler(Sampler):
    """Yields this data-parallel rank's list of sample indices for each micro-step.

    Infinite (wrapping around the dataset) unless ``total_samples`` is given, in which case it
    stops before the first global micro-batch that would go past ``total_samples``.
    """

    def __init__(
        self,
        dataset_len: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        total_samples: Optional[int] = None,
    ) -> None:
        self.dataset_len = _check_int("dataset length", dataset_len, 0)
        if self.dataset_len == 0:
            raise DataError("the dataset has 0 samples; nothing to train or evaluate on")
        self.consumed_samples = _check_int("consumed_samples", consumed_samples, 0)
        self.micro_batch_size = _check_int("model.micro_batch_size", micro_batch_size, 1)
        self.dp_size = _check_int("data-parallel size", dp_size, 1)
        self.dp_rank = _check_int("data-parallel rank", dp_rank, 0)
        if dp_rank >= dp_size:
            raise ConfigError(f"data-parallel rank {dp_rank} is out of range for data-parallel size {dp_size}")
        self.total_samples = None if total_samples is None else _check_int("total_samples", total_samples, 0)

    @property
    def global_micro_batch(self) -> int:
        return self.micro_batch_size * self.dp_size

    def indices_for_step(self, step: int) -> List[int]:
        """Sample indices of this rank for micro-step ``step`` (0 = the one at ``consumed_samples``)."""
        start = self.consumed_samples + step * self.global_micro_batch + self.dp_rank * self.micro_batch_size
        return [(start + j) % self.dataset_len for j in range(self.micro_batch_size)]

    def __len__(self) -> int:
        if self.total_samples is None:
            raise TypeError("an infinite PretrainingBatchSampler has no length (pass total_samples)")
        return max(0, (self.total_samples - self.consumed_samples) // self.global_micro_batch)

    def __iter__(self) -> Iterator[List[int]]:
        step = 0
        while self.total_samples is None or step < len(self):
            yield self.indices_for_step(step)
            step += 1


def collate_gpt_batch(samples: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """Stack GPT samples into ``tokens``/``labels``/``position_ids`` (int64) and ``loss_mask``
    (float32), each ``[batch, seq]``, plus ``segment_ids`` (int32, packed documents with
    ``model.data.reset_attention_mask``) when the samples have them; other keys (e.g. a blend's
    ``dataset_id``) are dropped."""
    batch = {}
    for key in BATCH_KEYS:
        batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples]).to(_DTYPES[key])
    if "segment_ids" in samples[0]:
        batch["segment_ids"] = torch.stack([torch.as_tensor(s["segment_ids"]) for s in samples]).to(torch.int32)
    return batch


def build_pretraining_dataloader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
    total_samples: Optional[int] = None,
) -> DataLoader:
    """A DataLoader over ``dataset`` that starts at ``consumed_samples`` (see module doc).

    Each iteration step gives this rank one micro-batch ``{tokens, labels, loss_mask,
    position_ids}`` of ``micro_batch_size`` samples. Infinite (wraps) unless ``total_samples``.
    """
    if dataset is None:
        raise DataError("no dataset to load from (the split was not built: it has 0 requested samples)")
    _check_int("model.data.num_workers", num_workers, 0)
    sampler = PretrainingBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size,
                                      total_samples)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=getattr(dataset, "collate_fn", None) or collate_gpt_batch,  # a dataset may bring its own
        pin_memory=False,
        persistent_workers=False,
    )


def compute_num_samples(
    max_steps: int,
    global_batch_size: int,
    val_check_interval: int,
    limit_val_batches: int,
    limit_test_batches: int = 0,
) -> Tuple[int, int, int]:
    """Samples each split must provide for a run: ``(train, valid, test)``.

    * train: ``max_steps * global_batch_size``;
    * valid: ``limit_val_batches`` global batches per validation, for one validation every
      ``val_check_interval`` steps plus one at the end, i.e.
      ``(max_steps // val_check_interval + 1) * limit_val_batches * global_batch_size`` -- enough
      whether the loop restarts validation at sample 0 or keeps reading on; 0 when
      ``val_check_interval`` or ``limit_val_batches`` is 0 (no validation);
    * test: ``limit_test_batches * global_batch_size`` (0: no test split is built).
    """
    _check_int("trainer.max_steps", max_steps, 0)
    _check_int("model.global_batch_size", global_batch_size, 1)
    _check_int("trainer.val_check_interval", val_check_interval, 0)
    _check_int("trainer.limit_val_batches", limit_val_batches, 0)
    _check_int("limit_test_batches", limit_test_batches, 0)
    train = max_steps * global_batch_size
    if val_check_interval == 0 or limit_val_batches == 0:
        valid = 0
    else:
        valid = (max_steps // val_check_interval + 1) * limit_val_batches * global_batch_size
    test = limit_test_batches * global_batch_size
    return train, valid, test
