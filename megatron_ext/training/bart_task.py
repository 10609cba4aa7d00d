"""BART-style denoising task for ``Trainer``: tokenizer (+ mask token) -> noised datasets -> encoder-decoder ->
token loss and token accuracy over the target.

Batch keys (``megatron_ext.data.bart``): ``text_enc`` [b, s] noised input, ``enc_mask`` [b, s] (True = real
token), ``text_dec`` [b, s_dec] = bos + original, ``labels`` [b, s_dec] = original + eos, ``loss_mask`` [b, s_dec].
Logged: ``train/loss``, ``train/accuracy``, ``val/loss``, ``val/accuracy`` (token-weighted over the target) and
``train/masked_accuracy`` / ``val/masked_accuracy``: accuracy on the target tokens that were inside a masked (or
deleted) span of the input -- the infilling skill proper, as copying the unmasked tokens is easy.
With a hiddens module (``model.hiddens``), ``train/loss`` is the joint loss and the module's terms are logged as
``train/tokens_loss``, ``train/hiddens/loss``, ``train/hiddens/<name>`` (weighted), ``train/hiddens/<name>_unweighted``
and ``train/hiddens/<name>/<term>`` (and the same under ``val/``).
"""
from __future__ import annotations

import logging
from typing import Dict, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from megatron_ext.modules.cross_entropy import masked_token_loss
from megatron_ext.data.bart import build_bart_datasets
from megatron_ext.models.families import FAMILIES
from megatron_ext.models.flops import encdec_flops_per_iteration
from megatron_ext.models.gpt import GPTModel
from megatron_ext.modules.common import tp_group, tp_rank, tp_world_size

log = logging.getLogger("megatron_ext")


def tp_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Argmax over the full vocabulary of vocab-parallel logits ``[..., V/tp]`` (ties -> lowest id)."""
    local_max, local_idx = logits.max(dim=-1)
    world = tp_world_size()
    if world == 1:
        return local_idx
    global_idx = local_idx + tp_rank() * logits.shape[-1]
    maxes = [torch.empty_like(local_max) for _ in range(world)]
    idxs = [torch.empty_like(global_idx) for _ in range(world)]
    dist.all_gather(maxes, local_max.contiguous(), group=tp_group())
    dist.all_gather(idxs, global_idx.contiguous(), group=tp_group())
    m = torch.stack(maxes, dim=-1)
    best = m.argmax(dim=-1, keepdim=True)  # first rank holding the max = lowest id
    return torch.stack(idxs, dim=-1).gather(-1, best).squeeze(-1)


class BARTTask:
    def __init__(self, cfg: DictConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.tokenizer = FAMILIES["encdec"].build_tokenizer(cfg.model.tokenizer)  # with BART's <mask>
        self.model = None

    @property
    def seq_length_dec(self) -> int:
        m = self.cfg.model
        return int(m.seq_length_dec if m.seq_length_dec is not None else m.seq_length)

    def build_model(self) -> torch.nn.Module:
        self.model = FAMILIES["encdec"].build(self.cfg.model, self.tokenizer.vocab_size,
                                              init_seed=self.cfg.trainer.seed)
        return self.model

    def build_datasets(self, num_samples: tuple[int, int, int]):
        d = self.cfg.model.data
        seed = d.seed if d.seed is not None else self.cfg.trainer.seed
        return build_bart_datasets(d, self.tokenizer, int(self.cfg.model.seq_length), self.seq_length_dec,
                                   num_samples, seed)

    def loss(self, model, batch: Dict[str, torch.Tensor], denominator: Optional[torch.Tensor] = None):
        """(loss, loss tokens, extras). The token loss is the summed cross-entropy of the target's loss-mask tokens
        divided by ``denominator`` (default: this micro-batch's loss-token count; the trainer passes the global
        batch's, see ``modules.cross_entropy.loss_token_denominator``), so averaged over the step's micro-batches it
        is token-weighted. With a hiddens module the joint loss adds the module's terms as they are defined there
        (per-sample means over this micro-batch): averaged over micro-batches, each is a mean over the global
        batch's samples, not weighted by tokens. Accuracies are (numerator, denominator) pairs: token-weighted."""
        inner = getattr(model, "module", model)  # the DeepSpeed engine wraps the model
        hm = getattr(inner, "hiddens_module", None)
        if hm is not None:
            logits, hidden_outputs = model(batch["text_enc"], batch["text_dec"], batch["enc_mask"], batch_data=batch,
                                           return_hiddens=True)
        else:
            logits = model(batch["text_enc"], batch["text_dec"], batch["enc_mask"])
        with torch.no_grad():
            pred = tp_argmax(logits.detach())
        labels = batch["labels"]
        per_token = GPTModel.loss_from_logits(logits, labels)  # vocab-parallel CE (megatron-core steps)
        loss, ntok = masked_token_loss(per_token, batch["loss_mask"], denominator)
        correct = (pred == labels).float()
        extras = {"accuracy": ((correct * batch["loss_mask"].float()).sum().detach(), ntok.detach())}
        if hm is not None:  # joint loss: tokens_loss_weight * tokens_loss + sum_i loss_weight_i * loss_i
            loss, terms = hm.compute_loss(loss, hidden_outputs, batch)
            extras.update({k: v.detach() for k, v in terms.items()})
        noised = batch.get("noised_mask")
        if noised is not None:  # accuracy on the target tokens that were masked/deleted in the input
            extras["masked_accuracy"] = ((correct * noised).sum().detach(), noised.sum().detach())
        return loss, ntok, extras

    def tokens_per_sample(self) -> int:
        """Encoder input + decoder target tokens processed per sample."""
        return int(self.cfg.model.seq_length) + self.seq_length_dec

    def flops_per_iteration(self, global_batch_size: int) -> float:
        return float(encdec_flops_per_iteration(self.cfg.model, self.tokenizer.vocab_size, global_batch_size))
