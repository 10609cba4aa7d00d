"""Per-token document ids for packed GPT samples (``model.data.reset_attention_mask=true``).

:class:`DocumentSegmentsDataset` wraps a GPT dataset (megatron-core's ``GPTDataset`` / ``BlendedDataset``, or any
dataset of dicts with ``tokens``) and adds ``segment_ids`` to every sample: int32 ``[s]``, the number of ``eod``
tokens before each token (:func:`megatron_ext.modules.doc_attention.segment_ids_from_tokens`). That is all the
document structure the model needs (``s`` int32 per sample, never an ``s x s`` mask); ``collate_gpt_batch`` stacks
it into ``[b, s]`` and the model's attention keeps to the documents (``megatron_ext.modules.doc_attention``).
Positions restart per document through megatron-core's own ``reset_position_ids`` (``position_ids`` of the sample).
"""
from __future__ import annotations

from typing import Any, Dict

from megatron_ext.modules.doc_attention import segment_ids_from_tokens


class DocumentSegmentsDataset:
    """``dataset`` with ``segment_ids`` added to each sample (see the module docstring); length and other attributes
    are the wrapped dataset's."""

    def __init__(self, dataset, eod: int):
        self.dataset = dataset
        self.eod = int(eod)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx) -> Dict[str, Any]:
        sample = dict(self.dataset[idx])
        sample["segment_ids"] = segment_ids_from_tokens(sample["tokens"], self.eod)
        return sample

    def __getattr__(self, name: str):
        if name in ("dataset", "eod") or name.startswith("__"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)


def with_segment_ids(datasets, eod: int):
    """Wrap a dataset, or each dataset of a ``{name: dataset}`` dict, in :class:`DocumentSegmentsDataset`; None
    stays None."""
    if datasets is None:
        return None
    if isinstance(datasets, dict):
        return type(datasets)((k, with_segment_ids(v, eod)) for k, v in datasets.items())
    return DocumentSegmentsDataset(datasets, eod)


__all__ = ["DocumentSegmentsDataset", "with_segment_ids"]
