"""Document sources of the BART datasets: one interface over ``.bin``/``.idx`` files, text files and JSONL files.

A source has ``name`` (the file or prefix, used in messages and for the sample seeds), ``attribute_keys`` (JSONL
attribute columns; empty otherwise), ``len(source)`` (documents), ``lengths()`` (int64 tokens per document) and
``tokens(doc, begin, end)`` (int64 ids); a JSONL source also has ``attributes(doc)`` (float32 per attribute key).

* :class:`IndexedDocuments`: one sequence of a megatron ``.bin``/``.idx`` pair is one document; a trailing ``eod``
  stored with it is not part of the document (the decoder target gets its own).
* :class:`TextDocuments`: one line of a text file is one document, tokenized when read
  (:class:`~megatron_ext.data.text_mmap.TextMemMapDataset`, so it works in DataLoader workers); the token counts
  are computed once and cached, and a line whose count changed since is a DataError (the file changed).
* :class:`JSONLDocuments`: the same over the ``text_key`` of a JSONL file
  (:class:`~megatron_ext.data.text_mmap.JSONLMemMapDataset`), with its numeric ``attribute_keys`` columns.

An :class:`IndexedDocuments` pickles without its open ``IndexedDataset``, which is reopened when first read (in a
DataLoader worker, say).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.data.text_mmap import JSONLMemMapDataset, TextMemMapDataset
from megatron_ext.errors import DataError


class IndexedDocuments:
    """Documents of a megatron ``.bin``/``.idx`` pair (one sequence = one document), trailing eod dropped."""

    attribute_keys: Tuple[str, ...] = ()

    def __init__(self, prefix: str, eod: int) -> None:
        self.name = prefix
        self.prefix = prefix
        self.eod = int(eod)
        ds = IndexedDataset(prefix, mmap=True)
        lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
        pointers = np.asarray(ds.index.sequence_pointers, dtype=np.int64)
        itemsize = np.dtype(ds.index.dtype).itemsize
        has_eod = np.zeros(lengths.shape[0], dtype=bool)
        nz = np.flatnonzero(lengths > 0)
        if nz.shape[0]:
            binmm = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
            for beg in range(0, nz.shape[0], 1 << 20):
                sel = nz[beg: beg + (1 << 20)]
                last = pointers[sel] // itemsize + lengths[sel] - 1
                has_eod[sel] = np.asarray(binmm[last]) == self.eod
            del binmm
        self._lengths = lengths - has_eod
        self._ds = ds

    def __getstate__(self) -> Dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_ds"}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ds = None

    def __len__(self) -> int:
        return int(self._lengths.shape[0])

    def lengths(self) -> np.ndarray:
        return self._lengths

    def tokens(self, doc: int, begin: int, end: int) -> np.ndarray:
        if self._ds is None:
                self._ds = IndexedDataset(self.prefix, mmap=True)
        return np.asarray(self._ds.get(int(doc), offset=int(begin), length=int(end - begin)), dtype=np.int64)


class TextDocuments:
    """Lines of a text file (:class:`TextMemMapDataset`), tokenized when read."""

    attribute_keys: Tuple[str, ...] = ()

    def __init__(self, path: str, tokenizer, index_mapping_dir: Optional[str] = None) -> None:
        self.name = path
        self.text = TextMemMapDataset(path, tokenizer=tokenizer, index_mapping_dir=index_mapping_dir)
        self.tokenizer = tokenizer
        self._lengths: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.text)

    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            self._lengths = self.text.token_lengths(self.tokenizer)
        return self._lengths

    def tokens(self, doc: int, begin: int, end: int) -> np.ndarray:
        ids = self.text.get_tokens(int(doc))
        expected = None if self._lengths is None else int(self._lengths[doc])
        if expected is not None and ids.shape[0] != expected:
            raise DataError(
                f"{self.name}, line {int(doc) + 1}: has {ids.shape[0]} tokens now but {expected} when the dataset "
                f"was built; the file changed during the run"
            )
        return ids[begin:end]


class JSONLDocuments(TextDocuments):
    """Lines of a JSONL file (:class:`JSONLMemMapDataset`): the text of ``text_key`` tokenized when read, and
    the float32 values of ``attribute_keys`` per document."""

    def __init__(self, path: str, tokenizer, index_mapping_dir: Optional[str] = None, text_key: str = "text",
                 attribute_keys: Sequence[str] = ()) -> None:
        self.name = path
        self.text = JSONLMemMapDataset(path, tokenizer=tokenizer, index_mapping_dir=index_mapping_dir,
                                       text_key=text_key, attribute_keys=attribute_keys)
        self.tokenizer = tokenizer
        self.attribute_keys = tuple(self.text.attribute_keys)
        self._lengths = None

    def attributes(self, doc: int) -> np.ndarray:
        """float32 ``[len(attribute_keys)]`` of document ``doc``."""
        return self.text.attributes(int(doc))


__all__ = ["IndexedDocuments", "TextDocuments", "JSONLDocuments"]
