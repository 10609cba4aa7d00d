"""The one table of model families: which family a config, a checkpoint or a model object belongs to, and how that
family's model and tokenizer are built.

    fam = family_of_config(cfg.model)            # a Family; ConfigError for an unknown model.arch
    tok = fam.build_tokenizer(cfg.model.tokenizer)
    model = fam.build(cfg.model, tok.vocab_size, init_seed=cfg.trainer.seed)
    family_of_model(model).name                  # "gpt" | "encdec" | "mega"

=========  ============================  ==========  ==============================================================
name       model class                   schema      predicate on the model section (``model.*``)
=========  ============================  ==========  ==============================================================
encdec     ``EncoderDecoderModel``       BARTConfig  has ``model.encoder`` or ``model.decoder``
mega       ``MegaGPTModel``              GPTConfig   ``model.arch=mega`` (and no encoder/decoder)
gpt        ``GPTModel`` (a pipeline      GPTConfig   ``model.arch=transformer`` (the default; no encoder/decoder)
           ``PipelineModule`` when
           ``pipeline_model_parallel_size > 1``)
=========  ============================  ==========  ==============================================================

The encoder-decoder rule is "encoder OR decoder": ``pretrain_bart.py``'s schema fills a missing side from its
defaults, so a BART config may name only one of them, while the GPT schema is closed and refuses both keys. The
predicates are tried in the table's order; a GPT-style section whose ``model.arch`` is neither ``transformer`` nor
``mega`` is a ``ConfigError`` naming the key. A model object's family is its class's entry (a GPT pipeline --
``is_pipeline`` -- is ``gpt``).

The builders are the ones training uses (``GPTTask`` / ``BARTTask``), so a checkpoint loader that builds through
this table gets the model training built. They take the typed model section and expect the parallel state to be set
up by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

from torch import nn

from megatron_ext.config.model_validation import is_encoder_decoder, model_arch
from megatron_ext.config.schema import BARTConfig, GPTConfig
from megatron_ext.errors import ConfigError
from megatron_ext.models.encoder_decoder import EncoderDecoderModel
from megatron_ext.models.gpt import GPTModel
from megatron_ext.models.gpt_pipe import build_gpt_pipeline
from megatron_ext.models.mega_lm import MegaGPTModel
from megatron_ext.tokenizers import build_tokenizer, ensure_mask_token

ARCHS = ("transformer", "mega")  # model.arch of a decoder-only (GPT-schema) config


def _build_gpt(cfg, vocab_size: int, *, init_seed: int) -> nn.Module:
    if int(cfg.pipeline_model_parallel_size) > 1:
        return build_gpt_pipeline(cfg, vocab_size, init_seed=init_seed)
    return GPTModel(cfg, vocab_size, init_seed=init_seed)


def _build_mega(cfg, vocab_size: int, *, init_seed: int) -> nn.Module:
    return MegaGPTModel(cfg, vocab_size, init_seed=init_seed)


def _build_encdec(cfg, vocab_size: int, *, init_seed: int) -> nn.Module:
    return EncoderDecoderModel(cfg, vocab_size, init_seed=init_seed)


def _gpt_tokenizer(tok_cfg):
    return build_tokenizer(tok_cfg.library, tok_cfg.model)


def _encdec_tokenizer(tok_cfg):  # BART's text infilling needs a <mask> id
    return ensure_mask_token(build_tokenizer(tok_cfg.library, tok_cfg.model))


@dataclass(frozen=True)
class Family:
    name: str
    model_class: type
    schema: type  # the run-config schema its entry point checks (GPTConfig / BARTConfig)
    predicate: Callable[[Any], bool]  # on the model section (dict, DictConfig or typed)
    build: Callable[..., nn.Module]  # (typed model section, vocab_size, *, init_seed) -> model
    build_tokenizer: Callable[[Any], Any]  # (model.tokenizer section) -> tokenizer


#: the table, in the order the predicates are tried
FAMILIES: Dict[str, Family] = {
    f.name: f for f in (
        Family("encdec", EncoderDecoderModel, BARTConfig, is_encoder_decoder, _build_encdec, _encdec_tokenizer),
        Family("mega", MegaGPTModel, GPTConfig, lambda m: not is_encoder_decoder(m) and model_arch(m) == "mega", _build_mega,
               _gpt_tokenizer),
        Family("gpt", GPTModel, GPTConfig, lambda m: not is_encoder_decoder(m) and model_arch(m) == "transformer", _build_gpt,
               _gpt_tokenizer),
    )
}


def family_of_config(model_cfg: Any) -> Family:
    """The family of a model section (``model.*`` of a run config, a checkpoint's ``meta.json`` or an archive)."""
    for fam in FAMILIES.values():
        if fam.predicate(model_cfg):
            return fam
    raise ConfigError(f"model.arch={model_arch(model_cfg)!r}: expected one of {', '.join(ARCHS)}")


def get_family(name: Any) -> Family:
    """The table entry for a family name (an archive manifest's ``family``)."""
    fam = FAMILIES.get(str(name))
    if fam is None:
        raise ConfigError(f"family={name!r}: expected one of {', '.join(FAMILIES)}")
    return fam


def family_of_model(model: nn.Module) -> Family:
    """The family of a model object (``.module`` wrappers such as the DeepSpeed engine are looked through)."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    if getattr(model, "is_pipeline", False):
        return FAMILIES["gpt"]
    for fam in FAMILIES.values():
        if type(model) is fam.model_class:
            return fam
    for fam in FAMILIES.values():
        if isinstance(model, fam.model_class):
            return fam
    raise TypeError(f"{type(model).__name__} is not one of the model classes "
                    f"{', '.join(f.model_class.__name__ for f in FAMILIES.values())}")


__all__ = ["ARCHS", "FAMILIES", "Family", "family_of_config", "family_of_model", "get_family"]
