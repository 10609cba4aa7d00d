"""GPT pretraining task: tokenizer -> datasets -> model -> masked LM loss, for ``Trainer``."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig

from megatron_ext.errors import ConfigError
from megatron_ext.modules.cross_entropy import masked_token_loss
from megatron_ext.data.doc_segments import with_segment_ids
from megatron_ext.data.gpt_data import build_gpt_datasets
from megatron_ext.data.gpt_text import build_gpt_text_split_datasets
from megatron_ext.data.synthetic import build_synthetic_datasets, resolve_synthetic
from megatron_ext.models.families import family_of_config
from megatron_ext.models.flops import gpt_flops_per_iteration
from megatron_ext.modules.doc_attention import segment_ids_from_tokens

log = logging.getLogger("megatron_ext")


class GPTTask:
    def __init__(self, cfg: DictConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        tok = cfg.model.tokenizer
        self.tokenizer = family_of_config(cfg.model).build_tokenizer(tok)
        self.model = None
        # model.data.task: a synthetic task (megatron_ext.data.synthetic) instead of the indexed datasets
        self.synthetic = resolve_synthetic(cfg.model.data, self.tokenizer, cfg.model.seq_length, tok.library)
        # documents of a packed sample attend only to themselves (checked: GPT transformer, no synthetic task)
        self.reset_attention_mask = bool(cfg.model.data.get("reset_attention_mask", False))

    # --------------------------------------------------------------- building
    def build_model(self) -> torch.nn.Module:
        """``GPTModel`` / ``MegaGPTModel`` (``model.arch``), or with ``model.pipeline_model_parallel_size > 1`` this
        rank's stages as a DeepSpeed ``PipelineModule`` (the builders of :mod:`megatron_ext.models.families`). All
        initialise from ``trainer.seed`` the same way (identical weights at any layout)."""
        m = self.cfg.model  # checked before any process started (config.model_validation): model.arch is valid
        self.model = family_of_config(m).build(m, self.tokenizer.vocab_size, init_seed=self.cfg.trainer.seed)
        return self.model

    def pipeline_batch(self, batch: Dict[str, torch.Tensor], denominator: Optional[torch.Tensor] = None):
        """A batch as DeepSpeed's pipeline engine wants it: (first-stage inputs, last-stage labels). ``denominator``
        (the trainer's token-weighting denominator of the global batch, see ``loss``) travels with the labels to
        the loss function of the last stage (``models.gpt_pipe.gpt_pipe_loss``). With
        ``model.data.reset_attention_mask`` the inputs are ``(tokens, position_ids, segment_ids)``: the segment
        ids travel through every stage with the activations."""
        tokens = batch["tokens"]
        pos = batch.get("position_ids")
        if pos is None:
            pos = torch.arange(tokens.shape[1], dtype=torch.long).unsqueeze(0).expand_as(tokens).contiguous()
        labels = (batch["labels"], batch["loss_mask"])
        if denominator is not None:
            labels = labels + (denominator.reshape(()),)
        seg = self.segment_ids(batch)
        return ((tokens, pos) if seg is None else (tokens, pos, seg)), labels

    def segment_ids(self, batch: Dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The batch's document ids (int32 ``[b, s]``) when ``model.data.reset_attention_mask`` is on, else None:
        the batch's ``segment_ids`` (``data.doc_segments``), or derived from its tokens' eod if a dataset's own
        collate function dropped them."""
        if not self.reset_attention_mask:
            return None
        seg = batch.get("segment_ids")
        if seg is None:
            seg = segment_ids_from_tokens(batch["tokens"], self.tokenizer.eod)
        return seg

    def build_datasets(self, num_samples: tuple[int, int, int]):
        d = self.cfg.model.data
        seed = d.seed if d.seed is not None else self.cfg.trainer.seed
        if self.synthetic is not None:
            if self.cfg.model.pipeline_model_parallel_size > 1:
                log.warning("model.data.task=%s with pipeline parallelism: val/exact_match is not computed (the "
                            "pipeline engine computes the loss itself)", self.synthetic.spec.name)
            return build_synthetic_datasets(self.synthetic, self.tokenizer, num_samples, seed)
        if str(d.get("data_impl", "mmap")) in ("text_mmap", "jsonl"):  # raw text / JSONL, tokenized on the fly
            splits = build_gpt_text_split_datasets(d, self.tokenizer, self.cfg.model.seq_length, num_samples, seed)
        else:
            if str(d.get("text_key", "text")) != "text":
                raise ConfigError(f"model.data.text_key={d.text_key!r} with model.data.data_impl={d.data_impl}: the "
                                  f"text key is read from JSONL files only (data_impl=jsonl); leave it at 'text'")
            splits = build_gpt_datasets(d, self.tokenizer, self.cfg.model.seq_length, num_samples, seed)
        if self.reset_attention_mask:  # samples carry their document ids (int32 [s])
            splits = tuple(with_segment_ids(ds, self.tokenizer.eod) for ds in splits)
        return splits

    # --------------------------------------------------------------- stepping
    def loss(self, model, batch: Dict[str, torch.Tensor], denominator: Optional[torch.Tensor] = None):
        """(loss, loss tokens, extras): the summed cross-entropy of the loss-mask tokens divided by ``denominator``
        (default: this micro-batch's loss-token count; the trainer passes the global batch's, see
        ``modules.cross_entropy.loss_token_denominator``)."""
        tokens, labels = batch["tokens"], batch["labels"]
        extras: Dict[str, Any] = {}
        if self.synthetic is None:
            seg = self.segment_ids(batch)
            if seg is None:
                per_token = model(tokens, position_ids=batch.get("position_ids"), labels=labels)
            else:
                per_token = model(tokens, position_ids=batch.get("position_ids"), labels=labels, segment_ids=seg)
        else:
            per_token, extras = self._loss_and_accuracy(model, batch)
        loss, ntok = masked_token_loss(per_token, batch["loss_mask"], denominator)
        return loss, ntok, extras

    @staticmethod
    def _loss_and_accuracy(model, batch: Dict[str, torch.Tensor]):
        """Synthetic tasks: the per-token loss plus, as (numerator, denominator) pairs the trainer sums over the
        validation batches, ``exact_match`` -- sequences whose every loss position (the target and its <eod>) is
        predicted by the argmax under teacher forcing, i.e. greedy generation after <sep> gives exactly the
        target -- and ``token_accuracy`` over the loss positions."""
        labels = batch["labels"]
        logits = model(batch["tokens"], position_ids=batch.get("position_ids"))
        net = getattr(model, "module", model)  # the DeepSpeed engine wraps the model
        with torch.no_grad():  # before the loss: its kernel may overwrite fp32 logits in place
            pred = net.gather_logits(logits).argmax(dim=-1)
            scored = batch["loss_mask"] > 0
            right = (pred == labels) & scored
            has_target = scored.any(dim=-1)
            exact = ((right | ~scored).all(dim=-1) & has_target).sum().float()
            extras = {"exact_match": (exact, has_target.sum().float()),
                      "token_accuracy": (right.sum().float(), scored.sum().float())}
        return net.loss_from_logits(logits, labels), extras

    def tokens_per_sample(self) -> int:
        return int(self.cfg.model.seq_length)

    def flops_per_iteration(self, global_batch_size: int) -> float:
        return float(gpt_flops_per_iteration(self.cfg.model, self.tokenizer.vocab_size, global_batch_size))
