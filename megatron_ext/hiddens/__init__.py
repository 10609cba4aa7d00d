"""Hiddens module: named transformations and losses between a Megatron encoder and decoder.

The encoder's output is named ``hiddens`` (``[S, B, H]``) with ``hiddens_mask`` (``[B, S]`` bool,
True = valid). Transformations (e.g. ``cond_gaussian``: a reparameterized Gaussian posterior
producing ``z_mean``, ``z_logvar``, ``z``, ``z_log_prob``) add named outputs; losses (``a_mim``,
``vae``, ``guided_cls_loss``) read any of them; ``enc_output_name`` picks the output the decoder
sees. The joint loss is ``tokens_loss_weight * tokens_loss + sum_i loss_weight_i * loss_i``.

Public API::

    get_hiddens_module(cfg, *, hidden_size, model_parallel_cfg=None) -> MegatronHiddensModule | None
    MegatronHiddensModule.apply_hidden_transforms(inputs, batch_data=None) -> outputs
        (all names + "enc_output", "enc_output_mask")
    MegatronHiddensModule.apply_loss_transforms(outputs, batch_data=None) -> {"hiddens/loss": ..., ...}
    MegatronHiddensModule.joint_loss(tokens_loss, hiddens_losses) -> (loss, log)
    get_registered_hiddens() -> {"loss": [...], "transform": [...]}
    register_hidden_transform(cls_name, class_path)   # class or dotted path
    register_hidden_loss(cls_name, class_path)
    MegatronBaseHiddenTransform, MegatronBaseHiddenLoss   # subclass these

Config format, validation, logged names: ``megatron_ext.hiddens.module``; the reduction of losses
(masked mean over valid positions, mean over the batch): ``megatron_ext.hiddens.base``.
"""
from megatron_ext.hiddens.base import MegatronBaseHiddenLoss, MegatronBaseHiddenTransform, masked_mean
from megatron_ext.hiddens.losses import MegatronAMIMHiddenLoss, MegatronGuidedClsHiddenLoss, MegatronVAEHiddenLoss
from megatron_ext.hiddens.module import MegatronHiddensModule, get_hiddens_module
from megatron_ext.hiddens.registry import (
    get_registered_hiddens,
    register_hidden_loss,
    register_hidden_transform,
    unregister_hidden_loss,
    unregister_hidden_transform,
)
from megatron_ext.hiddens.transforms import MegatronGaussianHiddenTransform, MegatronGuidedClsHiddenTransform

__all__ = [
    "get_registered_hiddens",
    "register_hidden_loss",
    "register_hidden_transform",
    "unregister_hidden_loss",
    "unregister_hidden_transform",
    "MegatronBaseHiddenTransform",
    "MegatronBaseHiddenLoss",
    "MegatronHiddensModule",
    "get_hiddens_module",
    "MegatronGaussianHiddenTransform",
    "MegatronGuidedClsHiddenTransform",
    "MegatronAMIMHiddenLoss",
    "MegatronVAEHiddenLoss",
    "MegatronGuidedClsHiddenLoss",
    "masked_mean",
]
