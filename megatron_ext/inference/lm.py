"""``LM``: a trained model with its tokenizer and config -- what ``restore_from`` returns (seed 003's "LM").

    lm = LM.restore_from("gpt.mext")                     # any family: gpt | encdec | mega
    lm.sample(pref="To be", max_seq_len=50, temperature=0.5)
    lm.perplexities(["hello", "hi there"], per_token=True)
    lm("hello")                                          # logits [1, s, vocab]
    lm.save_to("copy.mext")

Attributes: ``model`` (``GPTModel`` / ``EncoderDecoderModel`` / ``MegaGPTModel``, eval mode), ``tokenizer``,
``config`` (the resolved run config as a plain dict, ``config["model"]`` is the model section), ``family``
(``"gpt"``, ``"encdec"`` or ``"mega"``: the entry of :mod:`megatron_ext.models.families`), ``info`` (the
archive manifest when restored from one, or the checkpoint's step and layout).

``LM.restore_from`` is :func:`megatron_ext.checkpoint.loader.load_model` (an archive, or a run / checkpoint
directory of any layout, at the current TP layout) with the model wrapped here; ``save_to`` is
:func:`megatron_ext.checkpoint.archive.save_to` (collective when the model is split).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from megatron_ext.checkpoint.archive import save_to as _save_archive
from megatron_ext.checkpoint.loader import load_model
from megatron_ext.inference.inspection import get_embeddings as _embeddings
from megatron_ext.inference.generation import generate as _generate
from megatron_ext.inference.generation import sample as _sample
from megatron_ext.inference.scoring import perplexities as _perplexities
from megatron_ext.models.families import family_of_model


class LM:
    def __init__(self, model, tokenizer, config: Optional[Dict[str, Any]] = None, *,
                 info: Optional[Dict[str, Any]] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.family = family_of_model(model).name
        self.config = config or {}
        self.info = info or {}

    # ------------------------------------------------------------------ archives
    def save_to(self, path: str) -> str:
        return _save_archive(self.model, path, tokenizer=self.tokenizer, config=self.config)

    @classmethod
    def restore_from(cls, path: str, *, map_location: Union[str, torch.device] = "cpu") -> "LM":
        loaded = load_model(path, map_location=map_location)
        lm = cls(loaded.model, loaded.tokenizer, loaded.config, info=loaded.info)
        lm._files = loaded.files  # the extracted tokenizer file lives as long as the LM (save_to copies it again)
        return lm

    # ------------------------------------------------------------------ inputs
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text_or_ids: Union[str, Sequence[int], torch.Tensor]) -> List[int]:
        """A string (tokenized), a list of ids or a 1-D tensor -> a list of ids."""
        if isinstance(text_or_ids, str):
            return list(self.tokenizer.tokenize(text_or_ids))
        if isinstance(text_or_ids, torch.Tensor):
            if text_or_ids.dim() != 1:
                raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(text_or_ids.shape)}")
            return [int(t) for t in text_or_ids.tolist()]
        return [int(t) for t in text_or_ids]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.detokenize(list(ids))

    def as_batch(self, x) -> torch.Tensor:
        """String / id list / 1-D tensor -> ``[1, s]``; a 2-D tensor is taken as a batch as is."""
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            return x.long().to(self.device)
        return torch.tensor([self.encode(x)], dtype=torch.long, device=self.device)

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def __call__(self, x, get_embeddings: bool = False, source=None):
        """Full-vocabulary logits ``[b, s, vocab]`` for a string, id list, 1-D tensor or a ``[b, s]`` batch (for
        an encoder-decoder: the decoder input, given ``source``). With ``get_embeddings=True``:
        ``{"logits", "embeddings"}``, embeddings ``[b, layers + 1, s, hidden]`` (the stack's input, then every
        layer's output). The model's train/eval mode is left as it was."""
        tokens = self.as_batch(x)
        if self.family == "encdec" or get_embeddings:
            out = _embeddings(self, tokens, source=source)
            return out if get_embeddings else out["logits"]
        was = self.model.training
        self.model.eval()
        try:
            return self.model.gather_logits(self.model(tokens))
        finally:
            self.model.train(was)

    # ------------------------------------------------------------------ generation / scoring
    def generate(self, prompts, **kwargs):
        """Batched generation; see :func:`megatron_ext.inference.generation.generate` for the options."""
        return _generate(self, prompts, **kwargs)

    def sample(self, pref: Union[str, Sequence[int], torch.Tensor] = "", max_seq_len: int = 100,
               temperature: float = 1.0, nucleus: Optional[float] = None, top_k: Optional[int] = None,
               as_str: bool = True, **kwargs):
        """Seed 003's ``sample``: one continuation of ``pref`` up to ``max_seq_len`` tokens in all (prefix
        included); ``temperature=0`` is argmax; ``nucleus`` and ``top_k`` are mutually exclusive."""
        return _sample(self, pref, max_seq_len=max_seq_len, temperature=temperature, nucleus=nucleus,
                      top_k=top_k, as_str=as_str, **kwargs)

    def perplexities(self, data, **kwargs):
        """Seed 003's ``perplexities``; see :func:`megatron_ext.inference.scoring.perplexities`."""
        return _perplexities(self, data, **kwargs)


__all__ = ["LM"]
