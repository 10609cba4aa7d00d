"""Vocab-parallel cross-entropy: megatron-core's kernel with a cheaper row maximum.

``vocab_parallel_cross_entropy(logits, target)`` computes exactly what megatron-core's
``tensor_parallel.vocab_parallel_cross_entropy`` computes, over logits split along the vocabulary
across tensor-parallel ranks: the same all-reduces (MAX of the row maxima, SUM of the target
logits, SUM of the exponentials) over the TP group, the same in-place reuse of the fp32 logits
for the softmax (the caller's fp32 logits tensor is overwritten), and megatron-core's own
``VocabParallelCrossEntropy`` steps for the target logits, the loss and the gradient (its
``backward`` is used unchanged).

The one difference is the row maximum. megatron-core takes ``torch.max(logits, dim=-1)[0]``,
which also computes and writes an index tensor that is thrown away, a full extra pass over the
logits on CPU that ``amax`` does not make (the maximum only shifts the exponent for stability, its
position is never used). Values are identical: both return the
largest element of each row (NaN if the row has one).

Label smoothing, which our models do not use, goes to megatron-core's function unchanged.

``masked_token_loss(per_token, loss_mask, denominator)`` is the one reduction of per-token losses to the loss a
task backpropagates and reports: the sum of the per-token losses over the loss-mask tokens divided by a
denominator. Alone (no denominator) it is the masked mean over one micro-batch; the trainer passes
``loss_token_denominator(global_count, micro_batches, dp_size)`` so that the losses of all micro-batches and
data-parallel ranks, averaged the way DeepSpeed averages them (1/accumulation per backward, mean over DP), add up
to the token-weighted mean over the global batch: sum of token losses / global count of loss tokens.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from megatron.core.parallel_state import (
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as _Steps
from megatron.core.tensor_parallel.cross_entropy import _VocabParallelCrossEntropy as _MCoreFunction
from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy as _mcore_ce
from megatron.core.tensor_parallel.utils import VocabUtility


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vocab_parallel_logits, target):
        logits = vocab_parallel_logits.float()
        logits_max = logits.amax(dim=-1)
        group = get_tensor_model_parallel_group()
        world = get_tensor_model_parallel_world_size()
        if world > 1:
            torch.distributed.all_reduce(logits_max, op=torch.distributed.ReduceOp.MAX, group=group)
        partition_vocab_size = logits.size(-1)
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            partition_vocab_size, get_tensor_model_parallel_rank(), world
        )
        target_mask, masked_target_1d, predicted_logits, sum_exp_logits, exp_logits = (
            _Steps.calculate_predicted_logits(logits, target, logits_max, start, end)
        )
        if world > 1:
            torch.distributed.all_reduce(predicted_logits, op=torch.distributed.ReduceOp.SUM, group=group)
            torch.distributed.all_reduce(sum_exp_logits, op=torch.distributed.ReduceOp.SUM, group=group)
        softmax, loss = _Steps.calculate_cross_entropy_loss(exp_logits, predicted_logits, sum_exp_logits)
        # the fields megatron-core's backward reads
        ctx.label_smoothing, ctx.vocab_size = 0.0, partition_vocab_size
        ctx.save_for_backward(softmax, target_mask, masked_target_1d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_input, _, _ = _MCoreFunction.backward(ctx, grad_output)
        return grad_input, None


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-token cross-entropy (fp32, shape of ``target``) from logits ``[..., vocab / tp]``.

    Same contract as megatron-core's ``vocab_parallel_cross_entropy`` (see the module docstring).
    """
    if label_smoothing:
        return _mcore_ce(vocab_parallel_logits, target, label_smoothing)
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target)


def loss_token_count(loss_mask: torch.Tensor) -> torch.Tensor:
    """Number of loss tokens of a batch (``loss_mask`` is 1 where a token counts), as an fp64 scalar on the mask's
    device (exact for any realistic global batch; summed and all-reduced without a host sync)."""
    return loss_mask.detach().to(torch.float64).sum()


def loss_token_denominator(global_count: torch.Tensor, micro_batches: int, dp_size: int) -> torch.Tensor:
    """The per-micro-batch denominator that makes DeepSpeed's average of micro-batch losses token-weighted.

    DeepSpeed backpropagates ``loss / micro_batches`` on each rank and averages gradients over the ``dp_size``
    data-parallel ranks (its pipeline engine averages the reported loss the same way), so what it trains on and
    reports is ``mean over micro-batches and ranks of loss_i``. With ``loss_i = S_i / d``, ``S_i`` a micro-batch's
    sum of token losses and ``d = N / (micro_batches * dp_size)`` (``N`` = ``global_count``, the loss tokens of the
    whole global batch, at least 1), that mean is exactly ``sum_i S_i / N``, and so is its gradient."""
    return (global_count.clamp(min=1.0) / float(micro_batches * dp_size)).to(torch.float32)


def masked_token_loss(per_token: torch.Tensor, loss_mask: torch.Tensor,
                      denominator: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sum of per_token over the loss_mask tokens / denominator, number of loss tokens)`` in fp32.

    ``denominator`` defaults to this batch's number of loss tokens (at least 1): the masked mean. The trainer
    passes ``loss_token_denominator(...)`` to weight every token of the global batch equally."""
    mask = loss_mask.to(torch.float32)
    ntok = mask.sum()
    if denominator is None:
        denominator = ntok.clamp(min=1.0)
    return (per_token.float() * mask).sum() / denominator, ntok


__all__ = ["vocab_parallel_cross_entropy", "masked_token_loss", "loss_token_count", "loss_token_denominator"]
