"""``MegatronHiddensModule`` (named transforms + losses between encoder and decoder) and
``get_hiddens_module`` (builds one from the ``model.hiddens`` config).

Config (``model.hiddens``; every key optional)::

    enc_output_name: z          # output passed to the decoder (default: hiddens)
    tokens_loss_weight: 1.0     # weight of the tokens (reconstruction) loss (default: 1.0)
    transform:                  # a dict (one group) or a list of dicts (groups, applied in list order)
      - q_z_given_x: {cls_name: cond_gaussian, hidden_size: 64, min_logvar: -6.0}
      - logP_cls: {cls_name: guided_cls, input_name: hiddens, attr_name: logP}
        QED_cls: {cls_name: guided_cls, input_name: hiddens, attr_name: QED}
    loss:                       # the same format
      mim: {cls_name: a_mim, loss_weight: 1.0}
      logP_cls: {cls_name: guided_cls_loss, input_name: logP, loss_weight: 0.1}

* Each entry is ``<name>: {cls_name: <registered name>, <constructor kwargs>...}``; ``<name>`` is
  the instance name (transforms and losses have separate name spaces). ``name``,
  ``model_parallel_cfg`` and - when the class takes it and the entry omits it - ``hidden_size``
  (the encoder's) are filled in by the builder.
* A list sets the order: an entry may read any name produced by the encoder (``hiddens``,
  ``hiddens_mask``) or by the entries of *earlier* list items. The entries of one dict are
  unordered, so they may not read each other's outputs (put them in separate list items).
* Losses are computed after all transforms and may read any name.

Errors, all ``ConfigError`` at construction (before training) and naming the entry: a name produced
twice (including ``hiddens``, ``hiddens_mask`` and the module's ``enc_output`` /
``enc_output_mask``), an input nobody produced before the entry (or produced later / by a sibling in
the same dict), ``enc_output_name`` not produced, a missing or unknown ``cls_name`` (the message
lists the registered ones), constructor kwargs that do not match the class, a ``hidden_size`` that
is not the encoder's, duplicate entry names, unknown ``model.hiddens`` keys.

Outputs of ``apply_hidden_transforms``: every named output, plus ``enc_output`` (=
``outputs[enc_output_name]``, what the decoder cross-attends to) and ``enc_output_mask`` (``[B, S]``
bool, True = valid: ``outputs["<enc_output_name>_mask"]`` if a transform produces one, else
``hiddens_mask`` - the transforms keep the sequence positions).

Joint loss (``joint_loss``)::

    loss = tokens_loss_weight * tokens_loss + sum_i loss_weight_i * loss_i

with each ``loss_i`` a masked mean over valid positions and a mean over samples (see ``base``).

Logged values (flat dict of scalar tensors, detached; ``joint_loss`` returns it; the names are
fixed by the config, see ``log_names``):

* ``hiddens/loss``: ``sum_i loss_weight_i * loss_i`` (the hidden part of the joint loss);
* ``hiddens/<loss_name>``: ``loss_weight_i * loss_i`` (the weighted contribution);
* ``hiddens/<loss_name>_unweighted``: ``loss_i``;
* ``hiddens/<loss_name>/<term>``: every extra term the loss returns, reduced like the loss
  (e.g. ``hiddens/mim/log_prob_P_z``, ``hiddens/mim/log_prob_q_z_given_x``, ``hiddens/vae/kl_div``);
* ``tokens_loss``: the (unweighted) tokens loss.
"""
from __future__ import annotations

import inspect
import logging
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from megatron_ext.errors import ConfigError, DataError
from megatron_ext.hiddens.base import MegatronBaseHiddenLoss, MegatronBaseHiddenTransform, as_float
from megatron_ext.hiddens.registry import get_registered_hiddens, resolve_hidden_class

logger = logging.getLogger(__name__)

ENCODER_OUTPUT_NAMES = ("hiddens", "hiddens_mask")
MODULE_OUTPUT_NAMES = ("enc_output", "enc_output_mask")
LOG_PREFIX = "hiddens/"
TOTAL_LOSS_KEY = "hiddens/loss"
TOKENS_LOSS_KEY = "tokens_loss"
CONFIG_KEYS = ("enc_output_name", "tokens_loss_weight", "transform", "loss")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*")
# keys the builder fills in; a config entry may not set them
_INJECTED = ("name", "model_parallel_cfg")

TransformGroups = Sequence[Union[MegatronBaseHiddenTransform, Sequence[MegatronBaseHiddenTransform]]]
LossGroups = Sequence[Union[MegatronBaseHiddenLoss, Sequence[MegatronBaseHiddenLoss]]]


def _groups(items, base: type, what: str) -> List[List[Any]]:
    if items is None:
        return []
    if isinstance(items, base):
        items = [items]
    if not isinstance(items, (list, tuple, nn.ModuleList)):
        raise ConfigError(f"{what}: expected a list of {base.__name__} (or of lists of them), got {type(items).__name__}")
    groups = []
    for i, item in enumerate(items):
        group = list(item) if isinstance(item, (list, tuple, nn.ModuleList)) else [item]
        for obj in group:
            if not isinstance(obj, base):
                raise ConfigError(f"{what}[{i}]: expected a {base.__name__}, got {type(obj).__name__}")
        groups.append(group)
    return groups


class MegatronHiddensModule(nn.Module):
    """Named hidden transformations and losses between an encoder and a decoder.

    ``hidden_transforms``: transforms applied in order; an element may be a list of transforms (one
    unordered group whose members may not read each other's outputs). ``hidden_loss_transforms``:
    losses (lists allowed too). Instance names (``.name``) must be unique per kind. Parameters live
    under ``transforms.<name>.*`` and ``losses.<name>.*``. All validation happens here.
    """

    def __init__(
        self,
        hidden_transforms: TransformGroups = (),
        hidden_loss_transforms: LossGroups = (),
        enc_output_name: str = "hiddens",
        tokens_loss_weight: float = 1.0,
        cfg_key: str = "model.hiddens",
    ):
        super().__init__()
        self.cfg_key = cfg_key
        if not isinstance(enc_output_name, str) or not enc_output_name:
            raise ConfigError(f"{cfg_key}.enc_output_name={enc_output_name!r}: expected the name of an output")
        self.enc_output_name = enc_output_name
        self.tokens_loss_weight = as_float(tokens_loss_weight, f"{cfg_key}.tokens_loss_weight")
        transform_groups = _groups(hidden_transforms, MegatronBaseHiddenTransform, f"{cfg_key}.transform")
        loss_groups = _groups(hidden_loss_transforms, MegatronBaseHiddenLoss, f"{cfg_key}.loss")

        self.transforms = nn.ModuleDict()
        self.losses = nn.ModuleDict()
        self.transform_groups: List[List[str]] = []
        for group in transform_groups:
            self.transform_groups.append([self._add(self.transforms, t, "transform") for t in group])
        for group in loss_groups:
            for loss in group:
                self._add(self.losses, loss, "loss")

        self._validate()

    # ------------------------------------------------------------------ construction-time checks
    def _entry(self, kind: str, name: str) -> str:
        return f"{self.cfg_key}.{kind}.{name}"

    def _add(self, table: nn.ModuleDict, obj: nn.Module, kind: str) -> str:
        name = getattr(obj, "name", "")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigError(f"{self.cfg_key}.{kind}: hidden {kind} {type(obj).__name__} has name {name!r}; expected a "
                              f"non-empty name of letters, digits, '_' or '-'")
        if kind == "loss" and LOG_PREFIX + name == TOTAL_LOSS_KEY:
            raise ConfigError(f"{self._entry(kind, name)}: the loss name {name!r} is reserved ({TOTAL_LOSS_KEY} is the "
                              f"sum of the weighted hidden losses); rename the entry")
        if name in table:
            raise ConfigError(f"{self._entry(kind, name)}: the {kind} name {name!r} is used twice; entry names must be "
                              f"unique")
        if hasattr(table, name):
            raise ConfigError(f"{self._entry(kind, name)}: {name!r} cannot be used as a {kind} name (reserved by "
                              f"torch.nn.ModuleDict); rename the entry")
        table[name] = obj
        return name

    def _validate(self) -> None:
        producer: Dict[str, str] = {n: "the encoder" for n in ENCODER_OUTPUT_NAMES}
        reserved = {n: "the hiddens module (set from enc_output_name)" for n in MODULE_OUTPUT_NAMES}
        later: Dict[str, str] = {}
        for name, t in self.transforms.items():
            for out in t.output_names:
                later.setdefault(out, name)

        for group in self.transform_groups:
            available = set(producer)
            group_out: Dict[str, str] = {}
            for name in group:
                t = self.transforms[name]
                where = self._entry("transform", name)
                t.resolve_inputs(available)
                for inp in t.input_names:
                    if inp in available:
                        continue
                    if inp in group_out:
                        raise ConfigError(
                            f"{where} reads {inp!r}, which is produced by transform {group_out[inp]!r} of the same "
                            f"dict; the entries of one dict are unordered, so make them separate list items with "
                            f"{group_out[inp]!r} first")
                    if later.get(inp) == name:
                        raise ConfigError(f"{where} reads {inp!r}, which is its own output")
                    if inp in later:
                        raise ConfigError(
                            f"{where} reads {inp!r}, which is produced by transform {later[inp]!r} that comes later; "
                            f"order the transforms as a list with {later[inp]!r} before {name!r}")
                    raise ConfigError(f"{where} reads {inp!r}, which no earlier transform produces; available names: "
                                      f"{', '.join(sorted(available))}")
                outs = list(t.output_names)
                for out in outs:
                    if outs.count(out) > 1:
                        raise ConfigError(f"{where} declares the output {out!r} twice")
                    if out in reserved:
                        clash = reserved[out]
                    elif out in producer:
                        clash = producer[out] if out in ENCODER_OUTPUT_NAMES else f"transform {producer[out]!r}"
                    elif out in group_out:
                        clash = f"transform {group_out[out]!r}"
                    else:
                        clash = None
                    if clash is not None:
                        raise ConfigError(f"{where} produces {out!r}, which is already produced by {clash}; every "
                                          f"named output must be unique (rename the output, e.g. output_name)")
                    group_out[out] = name
            producer.update(group_out)

        if self.enc_output_name in MODULE_OUTPUT_NAMES or self.enc_output_name == "hiddens_mask":
            raise ConfigError(f"{self.cfg_key}.enc_output_name={self.enc_output_name!r}: expected an output to pass to "
                              f"the decoder, such as 'hiddens' or 'z'")
        if self.enc_output_name not in producer:
            raise ConfigError(f"{self.cfg_key}.enc_output_name={self.enc_output_name!r} is not produced by the encoder "
                              f"or any transform; available names: {', '.join(sorted(producer))}")

        available = set(producer)
        log_keys: Dict[str, str] = {}
        for name, loss in self.losses.items():
            where = self._entry("loss", name)
            loss.resolve_inputs(available)
            for inp in loss.input_names:
                if inp not in available:
                    raise ConfigError(f"{where} reads {inp!r}, which is not produced by the encoder or any transform; "
                                      f"available names: {', '.join(sorted(available))}")
            for key in self._loss_log_keys(name, loss):
                if key in log_keys:
                    raise ConfigError(f"{where}: its logged value {key!r} clashes with that of loss {log_keys[key]!r}; "
                                      f"rename one of the entries")
                log_keys[key] = name
        self._producer = producer

        used = {self.enc_output_name, self.enc_output_name + "_mask"}
        for module in list(self.transforms.values()) + list(self.losses.values()):
            used.update(module.input_names)
        for name, t in self.transforms.items():
            if t.output_names and not used.intersection(t.output_names):
                logger.warning("%s: its outputs %s are read by no loss or transform and are not enc_output_name=%r; "
                               "it only adds computation", self._entry("transform", name), list(t.output_names),
                               self.enc_output_name)

    @staticmethod
    def _loss_log_keys(name: str, loss: MegatronBaseHiddenLoss) -> List[str]:
        base = LOG_PREFIX + name
        return [base, base + "_unweighted"] + [f"{base}/{term}" for term in loss.output_names]

    # ------------------------------------------------------------------ introspection
    @property
    def output_names(self) -> List[str]:
        """Every name in the dict returned by ``apply_hidden_transforms``."""
        return list(self._producer) + list(MODULE_OUTPUT_NAMES)

    @property
    def log_names(self) -> List[str]:
        """Keys of the log dict returned by ``joint_loss`` (stable for a given config)."""
        keys = [TOTAL_LOSS_KEY]
        for name, loss in self.losses.items():
            keys += self._loss_log_keys(name, loss)
        return keys + [TOKENS_LOSS_KEY]

    # ------------------------------------------------------------------ forward
    def apply_hidden_transforms(self, inputs: Mapping[str, torch.Tensor],
                                batch_data: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
        """``inputs``: ``{"hiddens": [S, B, H], "hiddens_mask": [B, S] bool (True = valid; None = all)}``
        (what ``EncoderDecoderModel.encode`` returns) -> every named output plus ``enc_output`` and
        ``enc_output_mask`` (to pass to the decoder)."""
        hiddens = inputs.get("hiddens") if isinstance(inputs, Mapping) else None
        if not isinstance(hiddens, torch.Tensor) or hiddens.dim() != 3:
            raise DataError(f"hiddens module: inputs['hiddens'] must be the encoder output [S, B, H], got "
                            f"{tuple(hiddens.shape) if isinstance(hiddens, torch.Tensor) else type(hiddens).__name__}")
        s, b = hiddens.shape[0], hiddens.shape[1]
        mask = inputs.get("hiddens_mask")
        if mask is None:
            mask = torch.ones(b, s, dtype=torch.bool, device=hiddens.device)
        elif not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (b, s):
            raise DataError(f"hiddens module: inputs['hiddens_mask'] must be [B, S]={[b, s]} (True = valid), got "
                            f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        outputs: Dict[str, torch.Tensor] = {"hiddens": hiddens, "hiddens_mask": mask.bool()}
        for transform in self.transforms.values():
            outputs.update(transform.transform(outputs, batch_data))
        enc_output = outputs[self.enc_output_name]
        enc_mask = outputs.get(self.enc_output_name + "_mask", outputs["hiddens_mask"])
        if not isinstance(enc_output, torch.Tensor) or enc_output.dim() != 3 or \
                tuple(enc_mask.shape) != (enc_output.shape[1], enc_output.shape[0]):
            raise DataError(f"{self.cfg_key}.enc_output_name={self.enc_output_name!r}: the decoder needs a [S, B, H] "
                            f"tensor matching the mask [B, S]={list(enc_mask.shape)}, got "
                            f"{tuple(enc_output.shape) if isinstance(enc_output, torch.Tensor) else type(enc_output).__name__}")
        outputs["enc_output"] = enc_output
        outputs["enc_output_mask"] = enc_mask
        return outputs

    forward = apply_hidden_transforms

    def apply_loss_transforms(self, outputs: Mapping[str, torch.Tensor],
                              batch_data: Optional[Mapping] = None) -> Dict[str, torch.Tensor]:
        """All hidden losses on ``outputs`` (from ``apply_hidden_transforms``) -> the ``hiddens/*`` log dict;
        ``hiddens/loss`` keeps its graph (it is the hidden part of the joint loss), the rest is detached."""
        ref = outputs.get("hiddens") if isinstance(outputs, Mapping) else None
        device = ref.device if isinstance(ref, torch.Tensor) else None
        total = torch.zeros((), dtype=torch.float32, device=device)
        log: Dict[str, torch.Tensor] = {}
        for name, loss in self.losses.items():
            result = loss.loss(outputs, batch_data)
            base = LOG_PREFIX + name
            total = total + result["weighted_loss"]
            log[base] = result["weighted_loss"].detach()
            log[base + "_unweighted"] = result["loss"].detach()
            for term in loss.output_names:
                log[f"{base}/{term}"] = result[term].detach()
        return {TOTAL_LOSS_KEY: total, **log}

    def joint_loss(self, tokens_loss: torch.Tensor,
                   hiddens_losses: Optional[Mapping[str, torch.Tensor]] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``tokens_loss`` (scalar, e.g. the masked mean token cross-entropy) and the dict of
        ``apply_loss_transforms`` -> ``(loss, log)`` with
        ``loss = tokens_loss_weight * tokens_loss + sum_i loss_weight_i * loss_i`` and ``log`` the
        detached scalars named in ``log_names``."""
        tokens_loss = torch.as_tensor(tokens_loss)
        if tokens_loss.numel() != 1:
            raise DataError(f"hiddens module: tokens_loss must be a scalar (the reduced tokens loss), got shape "
                            f"{tuple(tokens_loss.shape)}")
        tokens_loss = tokens_loss.reshape(())
        if hiddens_losses is None:
            if len(self.losses):
                raise DataError("hiddens module: joint_loss needs the dict of apply_loss_transforms (this module has "
                                f"losses {list(self.losses)})")
            hiddens_losses = {TOTAL_LOSS_KEY: torch.zeros((), dtype=torch.float32, device=tokens_loss.device)}
        hidden = hiddens_losses[TOTAL_LOSS_KEY]
        loss = self.tokens_loss_weight * tokens_loss + hidden
        log = {k: v.detach() for k, v in hiddens_losses.items()}
        log[TOKENS_LOSS_KEY] = tokens_loss.detach()
        return loss, log

    def compute_loss(self, tokens_loss: torch.Tensor, outputs: Mapping[str, torch.Tensor],
                     batch_data: Optional[Mapping] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """``joint_loss(tokens_loss, apply_loss_transforms(outputs, batch_data))``."""
        return self.joint_loss(tokens_loss, self.apply_loss_transforms(outputs, batch_data))

    def extra_repr(self) -> str:
        return (f"enc_output_name={self.enc_output_name!r}, tokens_loss_weight={self.tokens_loss_weight}, "
                f"transform_groups={self.transform_groups}")


# ---------------------------------------------------------------------- config -> module
def _to_plain(cfg, cfg_key: str):
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        from omegaconf.errors import OmegaConfBaseException
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return cfg

    if isinstance(cfg, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(cfg, resolve=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{cfg_key}: {str(exc).splitlines()[0]}") from None
    return cfg


def _accepts(params: Optional[Mapping[str, inspect.Parameter]], key: str) -> bool:
    if params is None:
        return False
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _build_entry(kind: str, name, entry, where: str, hidden_size: int, model_parallel_cfg):
    registered = get_registered_hiddens()[kind]
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: entry name {name!r} must be a non-empty string of letters, digits, '_' or '-'")
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}={entry!r}: expected a dict with 'cls_name' (one of {', '.join(registered)}) and "
                          f"its parameters")
    kwargs = dict(entry)
    cls_name = kwargs.pop("cls_name", None)
    if cls_name is None:
        raise ConfigError(f"{where}: missing 'cls_name'; expected one of the registered hidden {kind}s: "
                          f"{', '.join(registered)}")
    cls = resolve_hidden_class(kind, cls_name, where)
    if "name" in kwargs and kwargs["name"] != name:
        raise ConfigError(f"{where}.name={kwargs['name']!r}: the entry key {name!r} is the instance name; remove 'name'")
    kwargs.pop("name", None)
    if "model_parallel_cfg" in kwargs:
        raise ConfigError(f"{where}.model_parallel_cfg: set by the model, not in the config; remove it")
    try:
        params = dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        params = None
    if "hidden_size" in kwargs:
        value = kwargs["hidden_size"]
        if isinstance(value, bool) or value != hidden_size:
            raise ConfigError(f"{where}.hidden_size={value!r} does not match the encoder hidden size {hidden_size} "
                              f"(model.encoder.hidden_size); set it to {hidden_size} or omit it")
    elif params is not None and "hidden_size" in params:
        kwargs["hidden_size"] = hidden_size
    for key, value in (("name", name), ("model_parallel_cfg", model_parallel_cfg)):
        if _accepts(params, key):
            kwargs[key] = value
    qual = f"cls_name={cls_name!r} ({cls.__module__}.{cls.__qualname__})"
    if params is not None:
        accepted = [p for p, v in params.items() if p not in _INJECTED and v.kind not in
                    (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
        try:
            inspect.signature(cls).bind(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{where}: parameters do not match {qual}: {exc}; accepted parameters: "
                              f"{', '.join(accepted) or '(none)'}") from None
    try:
        obj = cls(**kwargs)
    except (ConfigError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where} ({qual}): {exc}") from exc
    if not getattr(obj, "name", ""):
        obj.name = name
    elif obj.name != name:
        raise ConfigError(f"{where}: {qual} set its name to {obj.name!r}; it must keep the entry name {name!r}")
    return obj


def _build_kind(kind: str, value, cfg_key: str, hidden_size: int, model_parallel_cfg) -> List[List[Any]]:
    key = f"{cfg_key}.{kind}"
    if value is None:
        return []
    if isinstance(value, Mapping):
        raw_groups = [(key, value)]
    elif isinstance(value, (list, tuple)):
        raw_groups = []
        for i, group in enumerate(value):
            if not isinstance(group, Mapping):
                raise ConfigError(f"{key}[{i}]={group!r}: expected a dict of '<name>: {{cls_name: ..., ...}}' entries")
            raw_groups.append((f"{key}[{i}]", group))
    else:
        raise ConfigError(f"{key}={value!r}: expected a dict of '<name>: {{cls_name: ..., ...}}' entries or a list "
                          f"of such dicts (a list sets the order)")
    seen: Dict[str, str] = {}
    groups = []
    for gkey, group in raw_groups:
        built = []
        for name, entry in group.items():
            where = f"{gkey}.{name}"
            if name in seen:
                raise ConfigError(f"{where}: the {kind} name {name!r} is already used by {seen[name]}; entry names must "
                                  f"be unique")
            seen[name] = where
            built.append(_build_entry(kind, name, entry, where, hidden_size, model_parallel_cfg))
        if built:
            groups.append(built)
    return groups


def get_hiddens_module(cfg, *, hidden_size: int, model_parallel_cfg=None,
                       cfg_key: str = "model.hiddens") -> Optional[MegatronHiddensModule]:
    """Build the hiddens module from ``model.hiddens`` (a dict or an OmegaConf ``DictConfig``).

    Returns None when ``cfg`` is None or empty (no hiddens module: the encoder output goes to the
    decoder unchanged). ``hidden_size`` is the encoder's (checked against every entry's
    ``hidden_size`` and given to entries that take one and omit it); ``model_parallel_cfg`` (the
    megatron-core ``ModelParallelConfig``) is given to entries that take it. Raises ``ConfigError``.
    """
    if cfg is None:
        return None
    cfg = _to_plain(cfg, cfg_key)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{cfg_key}={cfg!r}: expected a dict with keys {', '.join(CONFIG_KEYS)}")
    if len(cfg) == 0:
        return None
    unknown = [k for k in cfg if k not in CONFIG_KEYS]
    if unknown:
        raise ConfigError(f"{cfg_key}: unknown key(s) {', '.join(map(repr, unknown))}; expected "
                          f"{', '.join(CONFIG_KEYS)}")
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise ConfigError(f"get_hiddens_module: hidden_size={hidden_size!r} must be the encoder's hidden size (a "
                          f"positive integer)")
    enc_output_name = cfg.get("enc_output_name")
    if enc_output_name is None:
        enc_output_name = "hiddens"
    tokens_loss_weight = cfg.get("tokens_loss_weight")
    tokens_loss_weight = 1.0 if tokens_loss_weight is None else as_float(tokens_loss_weight,
                                                                         f"{cfg_key}.tokens_loss_weight")
    transforms = _build_kind("transform", cfg.get("transform"), cfg_key, hidden_size, model_parallel_cfg)
    losses = _build_kind("loss", cfg.get("loss"), cfg_key, hidden_size, model_parallel_cfg)
    return MegatronHiddensModule(transforms, losses, enc_output_name=enc_output_name,
                                 tokens_loss_weight=tokens_loss_weight, cfg_key=cfg_key)


__all__ = [
    "MegatronHiddensModule",
    "get_hiddens_module",
    "ENCODER_OUTPUT_NAMES",
    "MODULE_OUTPUT_NAMES",
    "TOTAL_LOSS_KEY",
    "TOKENS_LOSS_KEY",
    "CONFIG_KEYS",
]
