"""Hiddens module: registry, config parsing and validation, built-in transforms and losses, joint loss."""
import glob
import logging
import math
import os

import pytest
import torch
from omegaconf import OmegaConf

from megatron_ext.errors import ConfigError, DataError
from megatron_ext.hiddens import (
    MegatronAMIMHiddenLoss,
    MegatronBaseHiddenLoss,
    MegatronBaseHiddenTransform,
    MegatronGaussianHiddenTransform,
    MegatronGuidedClsHiddenLoss,
    MegatronHiddensModule,
    MegatronVAEHiddenLoss,
    get_hiddens_module,
    get_registered_hiddens,
    register_hidden_loss,
    register_hidden_transform,
    unregister_hidden_loss,
    unregister_hidden_transform,
)

from helpers import REPO  # noqa: E402
LOG_2PI = math.log(2 * math.pi)
H = 8

# seed 000: the content of megatron_hiddens_base_config.yaml, verbatim
SEED_YAML = """
# this file main purpose is documentation, and it should not be used directly
enc_output_name: z # name of key in hidden transforms output to pass to decoder (default: hiddens). e.g., z for VAE/MIM.
tokens_loss_weight: 1.0 # weight of tokens loss (if not specified defaults to 1.0)
# the lists below are useful for adding multiple transforms and losses according to order
# if order is not important, you can use a single dictionary in the list with multiple keys
transform: # a list of dictionaries of transforms (or a joint dictionary) to apply to hiddens (list enforces order)
# - <transform_name>: # name of transform
#     cls_name: <a registered transformation class name> # class name
#     <transform_param>: <transform_value> # transform parameters
#     ...
  - q_z_given_x: # Gaussian posterior with reparameterization
      cls_name: cond_gaussian # class name
      hidden_size: 512 # hidden size of the encoder
      min_logvar: -6.0 # minimum log variance
  - logP_cls: # logP classifier logits
      cls_name: guided_cls
      input_name: hiddens
      attr_name: logP
    QED_cls: # QED classifier logits
      cls_name: guided_cls
      input_name: hiddens
      attr_name: QED
loss: # a list of dictionaries of loss terms (or a joint dictionary) to add to reconstruction loss (list enforces order)
# - <loss_name>: # name of loss
#     cls_name: <a registered loss class name> # class name
#     <loss_param>: <loss_value> # loss parameters
#     ...
# below is example where order of losses does not matter so a single dictionary is enough
    mim: # A-MIM example
        cls_name: a_mim
        loss_weight: 1.0 # weight of the MIM latent loss
    vae: # VAE example
        cls_name: vae
        min_kl_value: null # minimum KL value if a float is provided
        loss_weight: 1e-2 # weight of KL term in loss
    logP_cls: # logP classifier loss (cross entropy)
        cls_name: guided_cls_loss
        input_name: logP
        loss_weight: 0.1
    QED_cls: # QED classifier loss (cross entropy)
        cls_name: guided_cls_loss
        input_name: logP
        loss_weight: 0.1
"""

QUICK_START_OVERRIDES = [
    "++model.hiddens.enc_output_name=z",
    "++model.hiddens.transform.q_z_given_x.cls_name=cond_gaussian",
    "++model.hiddens.transform.q_z_given_x.hidden_size=64",
    "++model.hiddens.loss.mim.cls_name=a_mim",
    "++model.hiddens.loss.mim.loss_weight=1.0",
]


def gaussian(name="q", **kw):
    return {name: {"cls_name": "cond_gaussian", "hidden_size": H, **kw}}


def mim_cfg(**extra):
    return {"enc_output_name": "z", "transform": gaussian("q_z_given_x"),
            "loss": {"mim": {"cls_name": "a_mim", "loss_weight": 1.0}}, **extra}


def enc_inputs(s=5, b=3, h=H, seed=0):
    g = torch.Generator().manual_seed(seed)
    hiddens = torch.randn(s, b, h, generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    return {"hiddens": hiddens, "hiddens_mask": mask}


def build(cfg, hidden_size=H):
    return get_hiddens_module(cfg, hidden_size=hidden_size)


def config_error(cfg, *fragments, hidden_size=H):
    with pytest.raises(ConfigError) as info:
        build(cfg, hidden_size)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in: {msg}"
    return msg


# ---------------------------------------------------------------------------------------------- user classes
class ScaleTransform(MegatronBaseHiddenTransform):
    """Test transform: out = scale * input."""

    def __init__(self, hidden_size: int, scale: float = 2.0, input_name: str = "hiddens", output_name: str = "scaled",
                 name: str = "", model_parallel_cfg=None):
        super().__init__(name=name, model_parallel_cfg=model_parallel_cfg)
        self.scale, self.input_name, self.output_name = scale, input_name, output_name

    @property
    def input_names(self):
        return [self.input_name]

    @property
    def output_names(self):
        return [self.output_name]

    def _transform(self, inputs, batch_data=None):
        return {self.output_name: inputs[self.input_name] * self.scale}


class SquareLoss(MegatronBaseHiddenLoss):
    """Test loss: mean over H of x^2 per position, logs the mean of x too."""

    def __init__(self, input_name: str = "hiddens", loss_weight: float = 1.0, name: str = ""):
        super().__init__(loss_weight=loss_weight, name=name)
        self.input_name = input_name

    def _input_names(self):
        return [self.input_name]

    @property
    def output_names(self):
        return ["mean_x"]

    def _loss(self, inputs, batch_data=None):
        x = inputs[self.input_name].float()
        return {"loss": (x * x).mean(-1).transpose(0, 1), "mean_x": x.mean(-1).transpose(0, 1)}


@pytest.fixture
def user_classes():
    register_hidden_transform("test_scale", ScaleTransform)
    register_hidden_loss("test_square", f"{SquareLoss.__module__}.{SquareLoss.__qualname__}")
    try:
        yield
    finally:
        unregister_hidden_transform("test_scale")
        unregister_hidden_loss("test_square")


# ---------------------------------------------------------------------------------------------- registry
def test_registered_builtins():
    reg = get_registered_hiddens()
    assert reg == {"loss": sorted(reg["loss"]), "transform": sorted(reg["transform"])}
    assert {"a_mim", "vae", "guided_cls_loss"} <= set(reg["loss"])
    assert {"cond_gaussian", "guided_cls"} <= set(reg["transform"])


def test_register_user_classes_by_object_and_path(user_classes):
    reg = get_registered_hiddens()
    assert "test_scale" in reg["transform"] and "test_square" in reg["loss"]
    assert reg["loss"] == sorted(reg["loss"])
    m = build({"transform": {"s": {"cls_name": "test_scale", "scale": 3.0}},
               "loss": {"sq": {"cls_name": "test_square", "input_name": "scaled", "loss_weight": 0.5}}})
    assert isinstance(m.transforms["s"], ScaleTransform) and m.transforms["s"].name == "s"
    assert isinstance(m.losses["sq"], SquareLoss)  # imported lazily from the dotted path
    inp = {"hiddens": torch.ones(2, 1, H), "hiddens_mask": torch.ones(1, 2, dtype=torch.bool)}
    log = m.apply_loss_transforms(m(inp))
    assert log["hiddens/sq_unweighted"].item() == pytest.approx(9.0)
    assert log["hiddens/sq"].item() == pytest.approx(4.5)
    assert log["hiddens/sq/mean_x"].item() == pytest.approx(3.0)
    # re-registering the same class is a no-op; after unregistering the name is gone
    register_hidden_transform("test_scale", ScaleTransform)


def test_duplicate_registration_errors(user_classes):
    with pytest.raises(ValueError, match="duplicate.*test_scale"):
        register_hidden_transform("test_scale", "some.other.Class")
    with pytest.raises(ValueError, match="duplicate.*a_mim"):
        register_hidden_loss("a_mim", SquareLoss)
    with pytest.raises(ValueError, match="not a subclass"):
        register_hidden_loss("test_bad", ScaleTransform)


def test_registered_path_that_does_not_import():
    register_hidden_loss("test_missing", "no_such_package_xyz.module.Loss")
    try:
        config_error({"loss": {"l": {"cls_name": "test_missing"}}}, "model.hiddens.loss.l", "cannot import",
                     "no_such_package_xyz")
    finally:
        unregister_hidden_loss("test_missing")


# ---------------------------------------------------------------------------------------------- config errors
def test_empty_config_gives_none():
    assert get_hiddens_module(None, hidden_size=H) is None
    assert get_hiddens_module({}, hidden_size=H) is None
    assert get_hiddens_module(OmegaConf.create({}), hidden_size=H) is None


def test_unknown_cls_name_lists_registered():
    msg = config_error({"transform": {"q": {"cls_name": "cond_gauss"}}}, "model.hiddens.transform.q", "cond_gauss",
                       "cond_gaussian", "guided_cls")
    assert "unknown hidden transform" in msg
    config_error({"transform": {"q": {"cls_name": "a_mim"}}}, "a registered hidden loss, not a transform")
    config_error({"loss": [{"x": {"cls_name": "nope"}}]}, "model.hiddens.loss[0].x", "a_mim", "vae")


def test_missing_cls_name():
    config_error({"transform": {"q": {"hidden_size": H}}}, "model.hiddens.transform.q", "missing 'cls_name'",
                 "cond_gaussian")
    config_error({"loss": {"mim": {"loss_weight": 1.0}}}, "model.hiddens.loss.mim", "missing 'cls_name'", "a_mim")
    config_error({"loss": {"mim": None}}, "model.hiddens.loss.mim", "cls_name")


def test_bad_constructor_kwargs():
    config_error({"transform": gaussian("q", min_log_var=-5.0)}, "model.hiddens.transform.q", "min_log_var",
                 "accepted parameters", "min_logvar")
    config_error({"loss": {"mim": {"cls_name": "a_mim", "weight": 2.0}}}, "model.hiddens.loss.mim", "'weight'")
    # a missing required argument is named too
    config_error({"transform": {"c": {"cls_name": "guided_cls"}}}, "model.hiddens.transform.c", "attr_name")
    # bad values are caught in the constructor and also name the entry
    config_error(mim_cfg(loss={"mim": {"cls_name": "a_mim", "hidden_aggregation_method": "max"}}),
                 "model.hiddens.loss.mim", "hidden_aggregation_method", "sum, mean")
    config_error({"loss": {"v": {"cls_name": "vae", "loss_weight": "heavy"}}}, "model.hiddens.loss.v", "loss_weight")
    config_error({"transform": {"q": {"cls_name": "cond_gaussian", "name": "other"}}}, "model.hiddens.transform.q", "instance name")
    config_error({"transform": gaussian("q", model_parallel_cfg=1)}, "model.hiddens.transform.q", "model_parallel_cfg")


def test_hidden_size_mismatch():
    config_error({"transform": gaussian("q")}, "model.hiddens.transform.q.hidden_size=8", "encoder hidden size 64",
                 hidden_size=64)
    config_error({"transform": gaussian("q", ffn_hidden_size=3 * H)}, "model.hiddens.transform.q", "ffn_hidden_size",
                 str(2 * H))
    # hidden_size is filled in from the encoder when omitted
    m = build({"transform": {"q": {"cls_name": "cond_gaussian"}}}, hidden_size=16)
    assert m.transforms["q"].hidden_size == 16
    m = build({"transform": gaussian("q", ffn_hidden_size=2 * H)})
    assert m.transforms["q"].head.out_features == 2 * H


def test_duplicate_outputs():
    # two cond_gaussians in sequence both produce z_mean, ...
    config_error({"transform": [gaussian("a"), gaussian("b")]}, "model.hiddens.transform.b", "'z_mean'",
                 "transform 'a'")
    # ... and in one dict group too
    config_error({"transform": {**gaussian("a"), **gaussian("b")}}, "model.hiddens.transform.b", "transform 'a'")
    # clashes with the encoder's names and the module's enc_output / enc_output_mask
    for out in ("hiddens", "hiddens_mask"):
        config_error({"transform": {"c": {"cls_name": "guided_cls", "attr_name": "y", "output_name": out}}},
                     "model.hiddens.transform.c", repr(out), "the encoder")
    for out in ("enc_output", "enc_output_mask"):
        config_error({"transform": {"c": {"cls_name": "guided_cls", "attr_name": "y", "output_name": out}}},
                     "model.hiddens.transform.c", repr(out), "hiddens module")
    # the same entry name twice (list items)
    config_error({"transform": [gaussian("q"), gaussian("q")]}, "model.hiddens.transform[1].q", "already used")


def test_undefined_inputs():
    config_error({"loss": {"mim": {"cls_name": "a_mim"}}}, "model.hiddens.loss.mim", "'z'", "hiddens, hiddens_mask")
    config_error({"transform": {"c": {"cls_name": "guided_cls", "attr_name": "y", "input_name": "zz"}}},
                 "model.hiddens.transform.c", "'zz'", "no earlier transform")
    config_error({"transform": gaussian("q"), "loss": {"g": {"cls_name": "guided_cls_loss", "input_name": "logP"}}},
                 "model.hiddens.loss.g", "'logP'", "z_log_prob")


def test_enc_output_name_must_be_produced():
    config_error({"enc_output_name": "z"}, "model.hiddens.enc_output_name='z'", "not produced", "hiddens")
    config_error({"enc_output_name": "z", "loss": {"s": {"cls_name": "vae", "kl_estimator": "sample"}}},
                 "enc_output_name='z'")
    config_error({"enc_output_name": "enc_output"}, "enc_output_name='enc_output'")


def test_unknown_top_level_key_and_bad_shapes():
    config_error({"transforms": gaussian("q")}, "model.hiddens", "'transforms'", "transform")
    config_error({"transform": [["q"]]}, "model.hiddens.transform[0]")
    config_error({"transform": "cond_gaussian"}, "model.hiddens.transform")
    config_error({"loss": {"loss": {"cls_name": "a_mim"}}, "transform": gaussian("q")}, "model.hiddens.loss.loss",
                 "reserved")
    config_error({"tokens_loss_weight": "x"}, "model.hiddens.tokens_loss_weight")


# ---------------------------------------------------------------------------------------------- ordering
def test_transform_consumes_previous_output():
    cfg = {"enc_output_name": "z",
           "transform": [gaussian("q"), {"c": {"cls_name": "guided_cls", "attr_name": "y", "input_name": "z"}}],
           "loss": {"c": {"cls_name": "guided_cls_loss", "input_name": "y"}}}
    m = build(cfg)
    assert m.transform_groups == [["q"], ["c"]]
    out = m(enc_inputs())
    assert out["y"].shape == (3,)
    assert out["enc_output"] is out["z"]


def test_wrong_order_errors():
    cfg = {"transform": [{"c": {"cls_name": "guided_cls", "attr_name": "y", "input_name": "z"}}, gaussian("q")]}
    config_error(cfg, "model.hiddens.transform.c", "'z'", "transform 'q'", "later")
    # one dict group is unordered: a sibling's output cannot be read
    cfg = {"transform": {**gaussian("q"), "c": {"cls_name": "guided_cls", "attr_name": "y", "input_name": "z"}}}
    config_error(cfg, "model.hiddens.transform.c", "same dict", "'q'")


def test_user_transform_chain(user_classes):
    cfg = {"enc_output_name": "scaled2",
           "transform": [{"s1": {"cls_name": "test_scale", "scale": 2.0}},
                         {"s2": {"cls_name": "test_scale", "scale": 3.0, "input_name": "scaled",
                                 "output_name": "scaled2"}}]}
    m = build(cfg)
    inp = enc_inputs()
    out = m(inp)
    torch.testing.assert_close(out["enc_output"], inp["hiddens"] * 6)
    assert torch.equal(out["enc_output_mask"], inp["hiddens_mask"])


def test_one_output_feeds_two_losses():
    cfg = {"enc_output_name": "z", "transform": gaussian("q"),
           "loss": {"mim": {"cls_name": "a_mim"}, "vae": {"cls_name": "vae", "kl_estimator": "sample"}}}
    m = build(cfg)
    m.eval()
    inp = enc_inputs()
    out = m(inp)
    log = m.apply_loss_transforms(out)
    # both read z and z_log_prob: their log P(z) / log q(z|x) terms agree
    torch.testing.assert_close(log["hiddens/mim/log_prob_P_z"], log["hiddens/vae/log_prob_P_z"])
    torch.testing.assert_close(log["hiddens/mim/log_prob_q_z_given_x"], log["hiddens/vae/log_prob_q_z_given_x"])
    torch.testing.assert_close(log["hiddens/vae/kl_div"],
                               log["hiddens/vae/log_prob_q_z_given_x"] - log["hiddens/vae/log_prob_P_z"])


# ---------------------------------------------------------------------------------------------- joint loss
def test_joint_loss_formula_and_log_names():
    cfg = {"enc_output_name": "z", "tokens_loss_weight": 0.3, "transform": gaussian("q"),
           "loss": {"mim": {"cls_name": "a_mim", "loss_weight": 0.5},
                    "vae": {"cls_name": "vae", "loss_weight": "1e-2", "min_kl_value": None}}}
    m = build(OmegaConf.create(cfg))
    assert m.tokens_loss_weight == 0.3  # read from the config (NeMo ignores this key)
    torch.manual_seed(0)
    out = m(enc_inputs())
    hidden = m.apply_loss_transforms(out)
    tokens_loss = torch.tensor(2.5, requires_grad=True)
    loss, log = m.joint_loss(tokens_loss, hidden)
    mim, vae = log["hiddens/mim_unweighted"], log["hiddens/vae_unweighted"]
    expected = 0.3 * 2.5 + 0.5 * mim + 0.01 * vae
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(log["hiddens/mim"], 0.5 * mim)
    torch.testing.assert_close(log["hiddens/vae"], 0.01 * vae)
    torch.testing.assert_close(log["hiddens/loss"], 0.5 * mim + 0.01 * vae)
    assert log["tokens_loss"].item() == 2.5
    assert sorted(log) == sorted(m.log_names) == sorted([
        "hiddens/loss", "hiddens/mim", "hiddens/mim_unweighted", "hiddens/mim/log_prob_P_z",
        "hiddens/mim/log_prob_q_z_given_x", "hiddens/vae", "hiddens/vae_unweighted", "hiddens/vae/kl_div",
        "tokens_loss"])
    assert all(v.dim() == 0 and not v.requires_grad for v in log.values())
    # the hand computation of the hidden losses from the outputs
    mask = out["hiddens_mask"]
    mean, logvar, z, lq = (out[k].detach().float() for k in ("z_mean", "z_logvar", "z", "z_log_prob"))
    kl = (0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(-1)).T  # [B, S]
    lp = (-0.5 * (LOG_2PI + z ** 2)).sum(-1).T
    per_pos_mim = -0.5 * (lp + lq.T)

    def red(t):
        return torch.stack([t[i][mask[i]].mean() for i in range(t.shape[0])]).mean()

    torch.testing.assert_close(mim, red(per_pos_mim))
    torch.testing.assert_close(vae, red(kl))
    # gradients reach the tokens loss with the configured weight and the cond_gaussian head
    loss.backward()
    assert tokens_loss.grad.item() == pytest.approx(0.3)
    assert m.transforms["q"].head.weight.grad is not None


def test_joint_loss_without_losses():
    m = build({"tokens_loss_weight": 2.0, "transform": gaussian("q")})
    loss, log = m.joint_loss(torch.tensor(1.5), m.apply_loss_transforms(m(enc_inputs())))
    assert loss.item() == 3.0 and log == {"hiddens/loss": torch.tensor(0.0), "tokens_loss": torch.tensor(1.5)}
    with pytest.raises(DataError, match="scalar"):
        m.joint_loss(torch.ones(2), {"hiddens/loss": torch.tensor(0.0)})


def test_hiddens_only_module_is_identity():
    m = build({"tokens_loss_weight": 1.0})
    inp = enc_inputs()
    out = m(inp)
    assert out["enc_output"] is inp["hiddens"] and torch.equal(out["enc_output_mask"], inp["hiddens_mask"])


# ---------------------------------------------------------------------------------------------- cond_gaussian
def test_cond_gaussian_reparameterization_and_grads():
    t = MegatronGaussianHiddenTransform(hidden_size=H, min_logvar=-6.0, name="q")
    inp = enc_inputs()
    torch.manual_seed(123)
    out = t.transform(inp)
    assert out["z"].shape == (5, 3, H) and out["z_log_prob"].shape == (5, 3)
    torch.manual_seed(123)
    eps = torch.randn(5, 3, H)
    torch.testing.assert_close(out["z"], out["z_mean"] + torch.exp(0.5 * out["z_logvar"]) * eps)
    normal = torch.distributions.Normal(out["z_mean"], torch.exp(0.5 * out["z_logvar"]))
    torch.testing.assert_close(out["z_log_prob"], normal.log_prob(out["z"]).sum(-1), rtol=1e-5, atol=1e-4)
    # gradients reach both halves of the head (mean rows and log-variance rows) through z
    (out["z"] ** 2).sum().backward()
    grad = t.head.weight.grad
    assert grad[:H].abs().sum() > 0 and grad[H:].abs().sum() > 0
    assert t.head.bias.grad[:H].abs().sum() > 0 and t.head.bias.grad[H:].abs().sum() > 0


def test_cond_gaussian_logvar_floor_and_eval():
    t = MegatronGaussianHiddenTransform(hidden_size=H, min_logvar=-3.0, name="q")
    with torch.no_grad():
        t.head.bias[H:] = -10.0  # raw log-variance far below the floor
    inp = enc_inputs()
    out = t.transform(inp)
    assert (out["z_logvar"] >= -3.0).all()
    torch.testing.assert_close(out["z_logvar"], torch.full_like(out["z_logvar"], -3.0))
    t.eval()
    out = t.transform(inp)
    assert torch.equal(out["z"], out["z_mean"])
    torch.testing.assert_close(out["z_log_prob"], -0.5 * (LOG_2PI + out["z_logvar"]).sum(-1))
    t.sample_at_eval = True
    out = t.transform(inp)
    assert not torch.equal(out["z"], out["z_mean"])


def test_transform_runtime_input_check():
    t = MegatronGaussianHiddenTransform(hidden_size=H, name="q")
    with pytest.raises(DataError, match="hiddens"):
        t.transform({"x": torch.zeros(1)})
    with pytest.raises(DataError, match="H=8"):
        t.transform({"hiddens": torch.zeros(2, 2, 4)})


# ---------------------------------------------------------------------------------------------- losses vs closed forms
def fixed_latents(s=4, b=2):
    g = torch.Generator().manual_seed(7)
    mean = torch.randn(s, b, H, generator=g)
    logvar = torch.randn(s, b, H, generator=g) * 0.5
    eps = torch.randn(s, b, H, generator=g)
    z = mean + torch.exp(0.5 * logvar) * eps
    log_q = -0.5 * (LOG_2PI + logvar + eps ** 2).sum(-1)
    return {"z_mean": mean, "z_logvar": logvar, "z": z, "z_log_prob": log_q,
            "hiddens_mask": torch.ones(b, s, dtype=torch.bool)}


def test_vae_closed_form_kl():
    inp = fixed_latents()
    loss = MegatronVAEHiddenLoss(name="vae")
    res = loss.loss(inp)
    q = torch.distributions.Normal(inp["z_mean"], torch.exp(0.5 * inp["z_logvar"]))
    p = torch.distributions.Normal(torch.zeros(()), torch.ones(()))
    kl = torch.distributions.kl_divergence(q, p).sum(-1)  # [S, B]
    torch.testing.assert_close(res["kl_div"], kl.mean())
    torch.testing.assert_close(res["loss"], kl.mean())  # loss = +KL
    assert loss.mode == "closed_form" and loss.output_names == ["kl_div"]


def test_vae_sample_estimate():
    inp = fixed_latents()
    res = MegatronVAEHiddenLoss(kl_estimator="sample", name="vae").loss(inp)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(inp["z"]).sum(-1)
    torch.testing.assert_close(res["log_prob_P_z"], log_p.mean())
    torch.testing.assert_close(res["kl_div"], (inp["z_log_prob"] - log_p).mean())
    # auto: no z_mean/z_logvar available -> the sample estimate
    auto = MegatronVAEHiddenLoss(name="vae")
    res2 = auto.loss({k: inp[k] for k in ("z", "z_log_prob", "hiddens_mask")})
    assert auto.mode == "sample"
    torch.testing.assert_close(res2["kl_div"], res["kl_div"])


def test_a_mim_value():
    inp = fixed_latents()
    res = MegatronAMIMHiddenLoss(loss_weight=2.0, name="mim").loss(inp)
    log_p = (-0.5 * (LOG_2PI + inp["z"] ** 2)).sum(-1)
    expected = (-0.5 * (log_p + inp["z_log_prob"])).mean()
    torch.testing.assert_close(res["loss"], expected)
    torch.testing.assert_close(res["weighted_loss"], 2 * expected)
    torch.testing.assert_close(res["log_prob_P_z"], log_p.mean())
    torch.testing.assert_close(res["log_prob_q_z_given_x"], inp["z_log_prob"].mean())
    mean_res = MegatronAMIMHiddenLoss(hidden_aggregation_method="mean", name="mim").loss(inp)
    torch.testing.assert_close(mean_res["loss"], expected / H)
    torch.testing.assert_close(mean_res["log_prob_q_z_given_x"], inp["z_log_prob"].mean() / H)


def test_masked_positions_do_not_matter():
    inp = fixed_latents(s=5, b=3)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 2:] = False
    mask[2, 4] = False
    inp["hiddens_mask"] = mask
    garbage = {k: v.clone() for k, v in inp.items()}
    pad = ~mask.T  # [S, B]
    for k in ("z_mean", "z_logvar", "z"):
        garbage[k][pad] = 1e4
    garbage["z_log_prob"][pad] = float("nan")
    for loss in (MegatronAMIMHiddenLoss(name="mim"), MegatronVAEHiddenLoss(name="vae"),
                 MegatronVAEHiddenLoss(kl_estimator="sample", name="vs")):
        a, b = loss.loss(inp), loss.loss(garbage)
        for key in ["loss", *loss.output_names]:
            assert torch.isfinite(b[key])
            torch.testing.assert_close(a[key], b[key])
    # the value is the per-sample masked mean, then the mean over samples (not a sum over the batch)
    res = MegatronAMIMHiddenLoss(name="mim").loss(inp)
    log_p = (-0.5 * (LOG_2PI + inp["z"] ** 2)).sum(-1).T  # [B, S]
    per_pos = -0.5 * (log_p + inp["z_log_prob"].T)
    per_sample = torch.stack([per_pos[i][mask[i]].mean() for i in range(3)])
    torch.testing.assert_close(res["loss"], per_sample.mean())
    torch.testing.assert_close(res["log_prob_P_z"], torch.stack([log_p[i][mask[i]].mean() for i in range(3)]).mean())


def test_loss_weight_independent_of_micro_batch_size():
    inp = fixed_latents(s=3, b=2)
    double = {k: torch.cat([v, v], dim=1 if v.dim() >= 2 and k != "hiddens_mask" else 0) for k, v in inp.items()}
    loss = MegatronAMIMHiddenLoss(name="mim")
    torch.testing.assert_close(loss.loss(inp)["loss"], loss.loss(double)["loss"])


def test_vae_sign_and_free_bits():
    torch.manual_seed(0)
    mean = torch.randn(3, 2, H, requires_grad=True)
    logvar = (torch.randn(3, 2, H) * 0.3).requires_grad_()
    inp = {"z_mean": mean, "z_logvar": logvar, "hiddens_mask": torch.ones(2, 3, dtype=torch.bool)}
    vae = MegatronVAEHiddenLoss(name="vae")
    opt = torch.optim.SGD([mean, logvar], lr=1.0)
    first = vae.loss(inp)["kl_div"].item()
    for _ in range(20):
        opt.zero_grad()
        vae.loss(inp)["loss"].backward()
        opt.step()
    assert vae.loss(inp)["kl_div"].item() < 0.5 * first  # minimizing the loss decreases the KL
    # free bits: loss = max(KL, floor) per position; below the floor no gradient
    kl_now = vae.loss(inp)["kl_div"].item()
    floored = MegatronVAEHiddenLoss(min_kl_value=kl_now + 100.0, name="vae")
    res = floored.loss(inp)
    assert res["loss"].item() == pytest.approx(kl_now + 100.0)
    torch.testing.assert_close(res["kl_div"], torch.tensor(kl_now))
    mean.grad = None
    res["loss"].backward()
    assert mean.grad.abs().sum() == 0
    low = MegatronVAEHiddenLoss(min_kl_value=-1.0, name="vae").loss(inp)
    torch.testing.assert_close(low["loss"], low["kl_div"])


# ---------------------------------------------------------------------------------------------- guided_cls
def test_guided_cls_regression_and_classification():
    cfg = {"transform": {"reg": {"cls_name": "guided_cls", "attr_name": "logP"},
                         "cls": {"cls_name": "guided_cls", "attr_name": "label", "num_classes": 3,
                                 "output_name": "label_logits"}},
           "loss": {"reg": {"cls_name": "guided_cls_loss", "input_name": "logP", "loss_weight": 0.1},
                    "cls": {"cls_name": "guided_cls_loss", "input_name": "label_logits", "attr_name": "label"}}}
    m = build(cfg)
    inp = enc_inputs()
    batch = {"logP": torch.tensor([0.5, -1.0, float("nan")]), "label": torch.tensor([2, 0, -1])}
    out = m(inp, batch)
    assert out["logP"].shape == (3,) and out["label_logits"].shape == (3, 3)
    log = m.apply_loss_transforms(out, batch)
    # regression: squared error averaged over the labelled samples (NaN = no label)
    expected = ((out["logP"][:2] - batch["logP"][:2]) ** 2).mean()
    torch.testing.assert_close(log["hiddens/reg_unweighted"], expected.detach())
    torch.testing.assert_close(log["hiddens/reg"], 0.1 * expected.detach())
    ce = torch.nn.functional.cross_entropy(out["label_logits"][:2], batch["label"][:2])
    torch.testing.assert_close(log["hiddens/cls_unweighted"], ce.detach())
    # the prediction pools only valid positions: changing padded hiddens changes nothing
    inp2 = {k: v.clone() for k, v in inp.items()}
    inp2["hiddens"][3:, 1] = 100.0
    torch.testing.assert_close(m(inp2, batch)["logP"], out["logP"])
    # gradients reach the classifier heads
    log["hiddens/loss"].backward()
    assert m.transforms["reg"].fc1.weight.grad.abs().sum() > 0
    assert m.transforms["cls"].fc2.weight.grad.abs().sum() > 0


def test_guided_cls_loss_missing_attribute():
    m = build({"transform": {"c": {"cls_name": "guided_cls", "attr_name": "QED"}},
               "loss": {"c": {"cls_name": "guided_cls_loss", "input_name": "QED"}}})
    out = m(enc_inputs(), {"text_enc": torch.zeros(3, 5)})
    with pytest.raises(DataError, match=r"guided_cls_loss 'c'.*'QED'.*text_enc"):
        m.apply_loss_transforms(out, {"text_enc": torch.zeros(3, 5)})
    with pytest.raises(DataError, match="'QED'"):
        m.apply_loss_transforms(out, None)
    with pytest.raises(DataError, match="one value per sample"):
        m.apply_loss_transforms(out, {"QED": torch.zeros(2)})


def test_guided_cls_config_errors():
    config_error({"transform": {"c": {"cls_name": "guided_cls", "attr_name": "y", "num_classes": 1}}},
                 "model.hiddens.transform.c", "num_classes")
    config_error({"transform": {"c": {"cls_name": "guided_cls", "attr_name": "y", "hidden_size": 4}}},
                 "model.hiddens.transform.c.hidden_size=4")


def test_guided_cls_loss_class_ids_checked():
    loss = MegatronGuidedClsHiddenLoss(input_name="logits", attr_name="y", name="c")
    inp = {"logits": torch.zeros(2, 3), "hiddens_mask": torch.ones(2, 4, dtype=torch.bool)}
    with pytest.raises(DataError, match="outside"):
        loss.loss(inp, {"y": torch.tensor([0, 3])})
    assert loss.loss(inp, {"y": torch.tensor([0.0, 2.0])})["loss"].item() == pytest.approx(math.log(3))


# ---------------------------------------------------------------------------------------------- seed configs
def test_seed_example_yaml_builds(caplog):
    cfg = OmegaConf.create(SEED_YAML)
    with caplog.at_level(logging.WARNING, logger="megatron_ext.hiddens.module"):
        m = get_hiddens_module(cfg, hidden_size=512)
    assert isinstance(m, MegatronHiddensModule)
    assert m.enc_output_name == "z" and m.tokens_loss_weight == 1.0
    assert m.transform_groups == [["q_z_given_x"], ["logP_cls", "QED_cls"]]
    assert list(m.losses) == ["mim", "vae", "logP_cls", "QED_cls"]
    assert m.losses["vae"].loss_weight == 0.01 and m.losses["vae"].min_kl_value is None
    assert m.losses["vae"].mode == "closed_form"
    # the seed's QED_cls loss reads logP (a copy-paste slip): valid, but the QED classifier is then unused
    assert "QED_cls" in caplog.text and "read by no loss" in caplog.text
    s, b = 3, 2
    inp = {"hiddens": torch.randn(s, b, 512), "hiddens_mask": torch.ones(b, s, dtype=torch.bool)}
    batch = {"logP": torch.tensor([1.0, 2.0]), "QED": torch.tensor([0.3, 0.7])}
    out = m(inp, batch)
    assert out["enc_output"] is out["z"] and out["enc_output"].shape == (s, b, 512)
    loss, log = m.compute_loss(torch.tensor(4.0), out, batch)
    assert torch.isfinite(loss)
    assert {"hiddens/mim", "hiddens/vae/kl_div", "hiddens/logP_cls", "hiddens/QED_cls", "tokens_loss"} <= set(log)
    # with the slip fixed, the QED loss supervises the QED classifier
    fixed = OmegaConf.create(SEED_YAML)
    fixed.loss.QED_cls.input_name = "QED"
    m2 = get_hiddens_module(fixed, hidden_size=512)
    assert m2.losses["QED_cls"].attr_name == "QED"


def test_seed_example_yaml_wrong_hidden_size():
    config_error(OmegaConf.create(SEED_YAML), "model.hiddens.transform[0].q_z_given_x.hidden_size=512",
                 "encoder hidden size 64", hidden_size=64)


def test_quick_start_overrides_build():
    dotlist = [o[len("++model.hiddens."):] for o in QUICK_START_OVERRIDES]
    cfg = OmegaConf.from_dotlist(dotlist)
    m = get_hiddens_module(cfg, hidden_size=64)
    assert m.enc_output_name == "z" and list(m.transforms) == ["q_z_given_x"] and list(m.losses) == ["mim"]
    assert m.losses["mim"].loss_weight == 1.0
    out = m({"hiddens": torch.randn(4, 2, 64), "hiddens_mask": torch.ones(2, 4, dtype=torch.bool)})
    loss, log = m.compute_loss(torch.tensor(1.0), out)
    assert torch.isfinite(loss) and "hiddens/mim/log_prob_P_z" in log


def test_quick_start_overrides_through_project_config():
    loader = pytest.importorskip("megatron_ext.config.loader")
    from megatron_ext.config.schema import BARTConfig

    cfg = loader.load_config(BARTConfig, overrides=["model.encoder.hidden_size=64", *QUICK_START_OVERRIDES])
    m = get_hiddens_module(cfg.model.hiddens, hidden_size=cfg.model.encoder.hidden_size)
    assert list(m.transforms) == ["q_z_given_x"] and m.enc_output_name == "z"


def _configs_with_hiddens():
    paths = []
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)):
        try:
            if OmegaConf.select(OmegaConf.load(path), "model.hiddens"):
                paths.append(os.path.relpath(path, REPO))
        except Exception:  # not an OmegaConf YAML (e.g. a DeepSpeed JSON-ish file): not ours to judge
            continue
    return paths


@pytest.mark.parametrize("path", _configs_with_hiddens())
def test_repo_configs_with_hiddens_build(path):
    """Every shipped config with a model.hiddens section builds a module (schema defaults + the YAML)."""
    from megatron_ext.config.loader import load_config
    from megatron_ext.config.schema import BARTConfig

    cfg = load_config(BARTConfig, os.path.join(REPO, path))
    m = get_hiddens_module(cfg.model.hiddens, hidden_size=int(cfg.model.encoder.hidden_size))
    assert isinstance(m, MegatronHiddensModule)
    b, s = 2, 3
    out = m({"hiddens": torch.randn(s, b, cfg.model.encoder.hidden_size),
             "hiddens_mask": torch.ones(b, s, dtype=torch.bool)})
    loss, log = m.compute_loss(torch.tensor(1.0), out)
    assert torch.isfinite(loss) and sorted(log) == sorted(m.log_names)


def test_interpolation_error_is_config_error():
    root = OmegaConf.create({"model": {"hiddens": {"transform": {"q": {"cls_name": "cond_gaussian",
                                                                         "hidden_size": "${model.nope}"}}}}})
    with pytest.raises(ConfigError, match="model.hiddens"):
        get_hiddens_module(root.model.hiddens, hidden_size=H)


def test_transform_reading_its_own_output():
    config_error({"transform": {"c": {"cls_name": "guided_cls", "attr_name": "y", "input_name": "y"}}},
                 "model.hiddens.transform.c", "its own output")
