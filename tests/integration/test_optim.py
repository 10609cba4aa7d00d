"""Optimizer and LR-scheduler registries (megatron_ext.training.optim / lr_schedulers)."""
import copy
import io
import math
from dataclasses import dataclass

import pytest
import torch
from omegaconf import MISSING, OmegaConf

import megatron_ext  # noqa: F401  (sets DS_ACCELERATOR before deepspeed is imported)
from megatron_ext.errors import ConfigError
from megatron_ext.training import lr_schedulers as S
from megatron_ext.training import optim as O

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


L, M, W, T = 0.5, 0.05, 4, 24  # lr, min_lr, warmup steps, max_steps: decay over steps 4..24


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))


def _lrs(sched_cfg, steps, lr=L, max_steps=T):
    """lr used by optimizer step 0..steps-1 (the trainer's order: opt.step(); sched.step())."""
    model = torch.nn.Linear(2, 2)
    opt = O.build_optimizer(model, {"name": "sgd", "lr": lr})
    sched = S.build_scheduler(opt, sched_cfg, max_steps=max_steps)
    out = []
    for _ in range(steps):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == pytest.approx(sched.get_last_lr())
        assert len(set(lrs)) == 1
        out.append(lrs[0])
        opt.step()
        sched.step()
    return out


def _warm(s):
    return L * (s + 1) / (W + 1)


# (config, {step: expected lr}) -- expected values written from the closed forms.
P_MID = 14  # (14 - 4) / (24 - 4) = 0.5
SCHEDULE_CASES = {
    "WarmupPolicy": (
        {"name": "WarmupPolicy", "warmup_steps": W, "min_lr": M},
        {0: _warm(0), 2: _warm(2), W: L, P_MID: L, T: L, T + 1: M, T + 5: M},
    ),
    "WarmupHoldPolicy": (
        {"name": "WarmupHoldPolicy", "warmup_steps": W, "hold_steps": 6, "min_lr": M},
        {0: _warm(0), W: L, 7: L, 9: L, 10: L, T: L, T + 1: M},
    ),
    "CosineAnnealing": (
        {"name": "CosineAnnealing", "warmup_steps": W, "min_lr": M},
        {
            0: _warm(0),
            3: _warm(3),
            W: L,
            9: M + (L - M) * 0.5 * (1 + math.cos(math.pi / 4)),
            P_MID: M + (L - M) * 0.5,
            T: M,
            T + 1: M,
            T + 10: M,
        },
    ),
    "SquareAnnealing": (
        {"name": "SquareAnnealing", "warmup_steps": W, "min_lr": M},
        {0: _warm(0), W: L, P_MID: M + (L - M) * 0.25, T: M, T + 3: M},
    ),
    "SquareRootAnnealing": (
        {"name": "SquareRootAnnealing", "warmup_steps": W, "min_lr": M},
        {0: _warm(0), W: L, P_MID: M + (L - M) * math.sqrt(0.5), T: M, T + 3: M},
    ),
    "WarmupAnnealing": (
        {"name": "WarmupAnnealing", "warmup_steps": W, "min_lr": M},
        {0: _warm(0), W: L, 9: M + (L - M) * 0.75, P_MID: M + (L - M) * 0.5, T: M, T + 3: M},
    ),
    "PolynomialDecayAnnealing": (
        {"name": "PolynomialDecayAnnealing", "warmup_steps": W, "min_lr": M, "power": 3.0},
        {0: _warm(0), W: L, 9: M + (L - M) * 0.75**3, P_MID: M + (L - M) * 0.125, T: M, T + 3: M},
    ),
    "PolynomialHoldDecayAnnealing": (
        # decay from step 4 + 6 = 10 to 24: midpoint 17
        {"name": "PolynomialHoldDecayAnnealing", "warmup_steps": W, "hold_steps": 6, "min_lr": M, "power": 2.0},
        {0: _warm(0), W: L, 8: L, 10: L, 17: M + (L - M) * 0.25, T: M, T + 2: M},
    ),
    "InverseSquareRootAnnealing": (
        {"name": "InverseSquareRootAnnealing", "warmup_steps": W, "min_lr": M},
        {0: _warm(0), W: L, 9: L * math.sqrt(5 / 10), P_MID: L * math.sqrt(5 / 15), T: L * math.sqrt(5 / 25), T + 1: M},
    ),
    "NoamAnnealing": (
        # lr = L * 16^-0.5 * min(s^-0.5, s * 4^-1.5), s = max(1, step); >= min_lr after warmup
        {"name": "NoamAnnealing", "d_model": 16, "warmup_steps": W, "min_lr": 0.01},
        {0: L * 0.25 * 0.125, 1: L * 0.25 * 0.125, 2: L * 0.25 * 2 * 0.125, W: L * 0.25 * 0.5,
         16: L * 0.25 * 0.25, 64: L * 0.25 * 0.125, 400: 0.01},
    ),
    "constant": ({"name": "constant"}, {0: L, W: L, T: L, T + 10: L}),
    "none": ({"name": "none"}, {0: L, T + 10: L}),
    "StepLR": ({"name": "StepLR", "step_size": 5, "gamma": 0.5}, {0: L, 4: L, 5: L / 2, 12: L / 4, 30: L / 64}),
    "ExponentialLR": ({"name": "ExponentialLR", "gamma": 0.9}, {0: L, 1: L * 0.9, 10: L * 0.9**10}),
    "CyclicLR": (
        {"name": "CyclicLR", "base_lr": 0.1, "max_lr": 0.5, "step_size_up": 4, "cycle_momentum": False},
        {0: 0.1, 2: 0.3, 4: 0.5, 6: 0.3, 8: 0.1, 10: 0.3},
    ),
}


@pytest.mark.parametrize("name", sorted(SCHEDULE_CASES))
def test_scheduler_closed_form(name):
    cfg, expected = SCHEDULE_CASES[name]
    lrs = _lrs(cfg, max(expected) + 1)
    for step, value in expected.items():
        assert lrs[step] == pytest.approx(value, rel=1e-9, abs=1e-12), f"{name} step {step}"


def test_warmup_ratio_equals_warmup_steps_and_max_steps_override():
    by_steps = _lrs({"name": "CosineAnnealing", "warmup_steps": W, "min_lr": M}, T + 3)
    by_ratio = _lrs({"name": "CosineAnnealing", "warmup_ratio": W / T, "min_lr": M}, T + 3)
    assert by_ratio == by_steps
    # max_steps in the config wins over the argument (trainer.max_steps)
    override = _lrs({"name": "CosineAnnealing", "warmup_steps": W, "min_lr": M, "max_steps": T}, T + 3, max_steps=1000)
    assert override == by_steps
    # warmup_ratio uses the effective max_steps: 0.1 * 50 = 5 warmup steps
    lrs = _lrs({"name": "WarmupPolicy", "warmup_ratio": 0.1, "max_steps": 50}, 8, max_steps=1000)
    assert lrs[:7] == pytest.approx([L * (s + 1) / 6 for s in range(6)] + [L])


def test_missing_sched_and_meta_keys():
    assert _lrs(None, 5) == [L] * 5
    cfg = {"name": "CosineAnnealing", "warmup_steps": 0, "min_lr": 0.0, "monitor": "val_loss",
           "reduce_on_plateau": False, "interval": "step", "max_steps": None}
    lrs = _lrs(cfg, T + 1)
    assert lrs[0] == pytest.approx(L) and lrs[T] == pytest.approx(0.0)
    assert lrs[P_MID - W] == pytest.approx(L * 0.5 * (1 + math.cos(math.pi * 10 / 24)))


@pytest.mark.parametrize("name", sorted(SCHEDULE_CASES))
def test_scheduler_state_dict_round_trip(name):
    cfg, _ = SCHEDULE_CASES[name]
    stop, total = 7, 30

    def build():
        model = _tiny_model()
        opt = O.build_optimizer(model, {"name": "adamw", "lr": L, "weight_decay": 0.1})
        return model, opt, S.build_scheduler(opt, cfg, max_steps=T)

    def train_step(model, opt, sched):
        loss = model(torch.ones(2, 3)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return [g["lr"] for g in opt.param_groups]

    model, opt, sched = build()
    ref = [train_step(model, opt, sched) for _ in range(total)]

    model, opt, sched = build()
    for _ in range(stop):
        train_step(model, opt, sched)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain data only: loads without pickled classes

    model2, opt2, sched2 = build()
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    resumed = [train_step(model2, opt2, sched2) for _ in range(total - stop)]
    assert resumed == ref[stop:]
    for p, q in zip(model.parameters(), model2.parameters()):
        assert not torch.equal(p, q)  # model (the first resumed run) stopped at step 7
    # The fully trained and the resumed model agree.
    for _ in range(total - stop):
        train_step(model, opt, sched)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["CosineAnnealing", "NoamAnnealing", "PolynomialHoldDecayAnnealing", "constant"])
def test_closed_form_scheduler_restores_lr_without_optimizer_state(name):
    cfg, _ = SCHEDULE_CASES[name]
    ref = _lrs(cfg, 20)
    opt = O.build_optimizer(torch.nn.Linear(2, 2), {"name": "sgd", "lr": L})
    sched = S.build_scheduler(opt, cfg, max_steps=T)
    for _ in range(9):
        opt.step()
        sched.step()
    state = copy.deepcopy(sched.state_dict())
    opt2 = O.build_optimizer(torch.nn.Linear(2, 2), {"name": "sgd", "lr": L})
    sched2 = S.build_scheduler(opt2, cfg, max_steps=T)
    sched2.load_state_dict(state)
    got = []
    for _ in range(11):
        got.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert got == ref[9:]


# ---------------------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(O.AVAILABLE_OPTIMIZERS))
def test_every_registered_optimizer_builds_and_steps(name):
    model = _tiny_model()
    if name == "fused_adam":  # DeepSpeed FusedAdam wants the accelerator's tensors (CPU under DS_ACCELERATOR=cpu)
        from deepspeed.accelerator import get_accelerator

        model = model.to(get_accelerator().device_name())
    before = [p.detach().clone() for p in model.parameters()]
    opt = O.build_optimizer(model, {"name": name, "lr": 0.01})
    assert isinstance(opt, torch.optim.Optimizer)
    assert all(g["lr"] == 0.01 for g in opt.param_groups)
    loss = model(torch.randn(5, 3, device=before[0].device)).pow(2).mean()
    loss.backward()
    opt.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert all(changed), f"{name} left parameters unchanged: {changed}"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_expected_names_registered_and_params_dataclasses():
    for name in ("sgd", "adam", "adamw", "adadelta", "adamax", "adagrad", "rmsprop", "rprop"):
        assert name in O.AVAILABLE_OPTIMIZERS
        assert O.OPTIMIZER_PARAMS[name]().lr == "???"
    assert O.AVAILABLE_OPTIMIZERS["adamw"] is torch.optim.AdamW
    assert O.get_optimizer_params("AdamW") is O.AdamWParams
    assert O.AdamWParams().weight_decay == 0.01
    for name in ("WarmupPolicy", "WarmupHoldPolicy", "CosineAnnealing", "NoamAnnealing", "InverseSquareRootAnnealing",
                 "SquareRootAnnealing", "PolynomialDecayAnnealing", "WarmupAnnealing", "StepLR", "ExponentialLR",
                 "constant", "none"):
        assert name in S.AVAILABLE_SCHEDULERS and name in S.SCHEDULER_PARAMS


def test_build_optimizer_from_dictconfig_with_sched_and_interpolation():
    cfg = OmegaConf.create({
        "base_lr": 3e-4,
        "model": {"optim": {"name": "AdamW", "lr": "${base_lr}", "weight_decay": 0.1, "betas": [0.9, 0.95],
                            "eps": "1e-6", "sched": {"name": "CosineAnnealing", "warmup_steps": 2}}},
    })
    opt = O.build_optimizer(_tiny_model(), cfg.model.optim)
    assert isinstance(opt, torch.optim.AdamW)
    g = opt.param_groups[0]
    assert g["lr"] == 3e-4 and g["betas"] == (0.9, 0.95) and isinstance(g["betas"], tuple) and g["eps"] == 1e-6


def test_get_optimizer_returns_partial():
    factory = O.get_optimizer("sgd", lr=0.1, momentum=0.9)
    opt = factory(torch.nn.Linear(2, 2).parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    with pytest.raises(ConfigError, match="unknown optimizer 'nope'"):
        O.get_optimizer("nope")


def _err(fn, *args, **kwargs):
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_optimizer_errors():
    model = _tiny_model()
    msg = _err(O.build_optimizer, model, {"name": "adamz", "lr": 1e-3})
    assert "model.optim.name" in msg and "unknown optimizer 'adamz'" in msg
    for name in ("sgd", "adam", "adamw", "rprop"):
        assert name in msg

    msg = _err(O.build_optimizer, model, {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.95], "bettas": [0.9, 0.9]})
    assert "model.optim.bettas" in msg and "unknown key" in msg and "'betas'" in msg
    assert "Valid keys: amsgrad, betas, eps, foreach, fused, lr, name, sched, weight_decay" in msg

    msg = _err(O.build_optimizer, model, {"name": "sgd", "lr": 1e-3, "betas": [0.9, 0.95]},
               key_prefix="model.encoder.optim")
    assert "model.encoder.optim.betas" in msg and "optimizer 'sgd'" in msg

    msg = _err(O.build_optimizer, model, {"name": "adamw", "weight_decay": 0.1})
    assert "model.optim.lr" in msg and "required" in msg
    msg = _err(O.build_optimizer, model, OmegaConf.create({"name": "adamw", "lr": "???"}))
    assert "model.optim.lr" in msg and "required" in msg

    assert "model.optim.name" in _err(O.build_optimizer, model, {"lr": 1e-3})
    assert "model.optim.lr: expected float" in _err(O.build_optimizer, model, {"name": "adam", "lr": "fast"})
    assert "model.optim.betas" in _err(O.build_optimizer, model, {"name": "adam", "lr": 1e-3, "betas": [0.9]})
    assert "model.optim.amsgrad" in _err(O.build_optimizer, model, {"name": "adam", "lr": 1e-3, "amsgrad": "yes"})
    assert "model.optim.lr" in _err(O.build_optimizer, model, {"name": "adam", "lr": -1.0})
    # a value torch rejects is still a ConfigError naming the section
    msg = _err(O.build_optimizer, model, {"name": "adam", "lr": 1e-3, "betas": [1.5, 0.9]})
    assert msg.startswith("model.optim:") and "beta" in msg
    assert "mapping" in _err(O.build_optimizer, model, "adam")


def test_scheduler_errors():
    opt = O.build_optimizer(_tiny_model(), {"name": "adamw", "lr": 1e-3})
    msg = _err(S.build_scheduler, opt, {"name": "CosineAnnealing", "warmup_steps": 10, "warmup_ratio": 0.1}, 100)
    assert "model.optim.sched.warmup_steps" in msg and "model.optim.sched.warmup_ratio" in msg and "only one" in msg
    # a null partner is fine (the NeMo docs write warmup_ratio: null)
    S.build_scheduler(opt, {"name": "CosineAnnealing", "warmup_steps": 10, "warmup_ratio": None}, 100)

    msg = _err(S.build_scheduler, opt, {"name": "CosineAnnealing", "warmup_step": 10}, 100)
    assert "model.optim.sched.warmup_step" in msg and "'warmup_steps'" in msg and "max_steps" in msg

    msg = _err(S.build_scheduler, opt, {"name": "CosineAnealing"}, 100)
    assert "model.optim.sched.name" in msg and "CosineAnnealing" in msg and "WarmupPolicy" in msg

    assert "model.optim.sched.name" in _err(S.build_scheduler, opt, {"warmup_steps": 1}, 100)
    msg = _err(S.build_scheduler, opt, {"name": "CosineAnnealing", "warmup_steps": 200}, 100)
    assert "model.optim.sched.warmup_steps" in msg and "exceeds max_steps (100)" in msg
    msg = _err(S.build_scheduler, opt, {"name": "CosineAnnealing", "min_lr": 1e-2}, 100)
    assert "model.optim.sched.min_lr" in msg and "model.optim.lr" in msg
    msg = _err(S.build_scheduler, opt, {"name": "CosineAnnealing"}, None)
    assert "model.optim.sched.max_steps" in msg
    assert "model.optim.sched.max_steps" in _err(S.build_scheduler, opt, {"name": "CosineAnnealing", "max_steps": 0}, 10)
    assert "model.optim.sched.step_size" in _err(S.build_scheduler, opt, {"name": "StepLR"}, 100)
    assert "model.optim.sched.d_model" in _err(S.build_scheduler, opt, {"name": "NoamAnnealing"}, 100)
    assert "model.optim.sched.warmup_ratio" in _err(S.build_scheduler, opt, {"name": "WarmupPolicy", "warmup_ratio": 1.5}, 100)
    assert "reduce_on_plateau" in _err(S.build_scheduler, opt, {"name": "constant", "reduce_on_plateau": True}, 100)
    assert "model.optim.sched.interval" in _err(S.build_scheduler, opt, {"name": "constant", "interval": "epoch"}, 100)
    # leftover keys of another schedule are reported (no silent ignore)
    msg = _err(S.build_scheduler, opt, {"name": "StepLR", "step_size": 2, "min_lr": 0.0}, 100)
    assert "model.optim.sched.min_lr" in msg and "step_size" in msg


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


class SignSGD(torch.optim.Optimizer):
    def __init__(self, params, lr, scale=1.0):
        super().__init__(params, dict(lr=lr, scale=scale))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-g["lr"] * g["scale"])


@dataclass
class SignSGDParams(O.OptimizerParams):
    scale: float = 1.0


class HalvingLR(torch.optim.lr_scheduler.LRScheduler):
    def __init__(self, optimizer, factor, max_steps=None, last_epoch=-1):
        self.factor, self.max_steps = factor, max_steps
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [lr * self.factor ** self.last_epoch for lr in self.base_lrs]


@dataclass
class HalvingLRParams:
    factor: float = MISSING


@pytest.fixture
def clean_registries():
    opts, opt_params = dict(O.AVAILABLE_OPTIMIZERS), dict(O.OPTIMIZER_PARAMS)
    scheds, sched_params = dict(S.AVAILABLE_SCHEDULERS), dict(S.SCHEDULER_PARAMS)
    yield
    for live, saved in ((O.AVAILABLE_OPTIMIZERS, opts), (O.OPTIMIZER_PARAMS, opt_params),
                        (S.AVAILABLE_SCHEDULERS, scheds), (S.SCHEDULER_PARAMS, sched_params)):
        live.clear()
        live.update(saved)


def test_register_optimizer(clean_registries):
    O.register_optimizer("signsgd", SignSGD, SignSGDParams)
    model = torch.nn.Linear(3, 1, bias=False)
    w0 = model.weight.detach().clone()
    opt = O.build_optimizer(model, {"name": "SignSGD", "lr": 0.1, "scale": 0.5, "sched": {"name": "none"}})
    assert isinstance(opt, SignSGD)
    model(torch.tensor([[1.0, -2.0, 0.0]])).sum().backward()
    opt.step()
    torch.testing.assert_close(model.weight.detach(), w0 - 0.05 * torch.tensor([[1.0, -1.0, 0.0]]))
    assert "model.optim.momentum" in _err(O.build_optimizer, model, {"name": "signsgd", "lr": 0.1, "momentum": 0.9})
    with pytest.raises(ValueError, match="cannot override"):
        O.register_optimizer("adamw", SignSGD, SignSGDParams)
    with pytest.raises(ValueError, match="lr"):
        O.register_optimizer("other", SignSGD, HalvingLRParams)


def test_register_scheduler(clean_registries):
    S.register_scheduler("HalvingLR", HalvingLR, HalvingLRParams)
    opt = O.build_optimizer(torch.nn.Linear(2, 2), {"name": "sgd", "lr": 0.8})
    sched = S.build_scheduler(opt, {"name": "HalvingLR", "factor": 0.5}, max_steps=33)
    assert isinstance(sched, HalvingLR) and sched.max_steps == 33
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.8, 0.4, 0.2, 0.1])
    assert "model.optim.sched.factor" in _err(S.build_scheduler, opt, {"name": "HalvingLR"}, 10)
    with pytest.raises(ValueError, match="cannot override"):
        S.register_scheduler("cosineannealing", HalvingLR, HalvingLRParams)


# ---------------------------------------------------------------------------------------
# Param groups
# ---------------------------------------------------------------------------------------


class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 6)
        self.proj = torch.nn.Linear(6, 6)
        self.norm = torch.nn.LayerNorm(6)
        self.rms = torch.nn.RMSNorm(6)
        self.head = torch.nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.frozen = torch.nn.Linear(6, 6)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(self.rms(self.norm(self.proj(self.embed(x)))))


def test_param_groups_no_decay_for_bias_and_norm_and_tied_once():
    model = TiedLM()
    groups = O.get_param_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert decay == {id(model.embed.weight), id(model.proj.weight)}
    assert no_decay == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias), id(model.rms.weight)}
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == 6  # tied weight once, frozen layer left out


def test_build_optimizer_applies_weight_decay_only_to_decay_group():
    model = TiedLM()
    opt = O.build_optimizer(model, {"name": "adamw", "lr": 0.1, "weight_decay": 0.5})
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: AdamW's only change is the decoupled decay
    opt.step()
    after = dict(model.named_parameters())
    torch.testing.assert_close(after["embed.weight"], before["embed.weight"] * (1 - 0.1 * 0.5))
    torch.testing.assert_close(after["proj.weight"], before["proj.weight"] * (1 - 0.1 * 0.5))
    for n in ("proj.bias", "norm.weight", "norm.bias", "rms.weight", "frozen.weight"):
        torch.testing.assert_close(after[n], before[n], rtol=0, atol=0)
    # optimizers without weight decay get one group; explicit param groups are used as given
    assert len(O.build_optimizer(model, {"name": "rprop", "lr": 0.01}).param_groups) == 1
    groups = [{"params": [model.proj.weight], "lr": 0.5}, {"params": [model.proj.bias]}]
    opt = O.build_optimizer(groups, {"name": "sgd", "lr": 0.1})
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]


def test_deepspeed_arch_list_drops_arch_specific_suffix():
    assert O._deepspeed_arch_list("8.0;9.0a 9.0+PTX;10.0f;8.0") == "8.0;9.0;9.0+PTX;10.0"
    assert O._deepspeed_arch_list("7.5") == "7.5"


# ---------------------------------------------------------------------------------------
# Errors keep their cause; an unavailable DeepSpeed optimizer says why
# ---------------------------------------------------------------------------------------


def test_optimizer_constructor_errors_are_config_errors_with_their_cause(clean_registries):
    model = _tiny_model()
    with pytest.raises(ConfigError, match=r"^model.optim: invalid settings for optimizer 'adam'") as info:
        O.build_optimizer(model, {"name": "adam", "lr": 1e-3, "betas": [1.5, 0.9]})
    assert isinstance(info.value.__cause__, ValueError) and "beta" in str(info.value.__cause__)
    # torch refuses fused together with foreach with a RuntimeError: a config error naming the optimizer
    with pytest.raises(ConfigError, match="optimizer 'adam' cannot be created here") as info:
        O.build_optimizer(model, {"name": "adam", "lr": 1e-3, "fused": True, "foreach": True})
    assert isinstance(info.value.__cause__, RuntimeError)

    class Broken(torch.optim.SGD):  # a bug inside an optimizer is not the user's config: it propagates as is
        def __init__(self, params, lr, scale=1.0):
            raise KeyError("internal bookkeeping")

    O.register_optimizer("broken", Broken, SignSGDParams)
    with pytest.raises(KeyError, match="internal bookkeeping"):
        O.build_optimizer(model, {"name": "broken", "lr": 0.1})


def test_unavailable_deepspeed_optimizer_names_the_reason(monkeypatch):
    """When DeepSpeed's op builder reports FusedAdam incompatible, asking for ``fused_adam`` says why (the builder's
    own message), instead of 'unknown optimizer'."""
    import deepspeed.accelerator
    from deepspeed.accelerator import get_accelerator

    real = get_accelerator()
    fused_cls = type(real.create_op_builder("FusedAdamBuilder"))

    class NoToolchainFusedAdam(fused_cls):
        def is_compatible(self, verbose=False):
            if verbose:
                self.warning("fused_adam requires a C++ compiler with AVX2 (none found)")
            return False

    class Accelerator(type(real)):
        def create_op_builder(self, op_name):
            if op_name == "FusedAdamBuilder":
                return NoToolchainFusedAdam()
            return super().create_op_builder(op_name)

    for name in ("AVAILABLE_OPTIMIZERS", "OPTIMIZER_PARAMS", "_DEEPSPEED_CLASSES"):
        live = getattr(O, name)
        monkeypatch.setattr(O, name, {k: v for k, v in live.items() if k not in ("fused_adam", "cpu_adam")})
    monkeypatch.setattr(O, "DEEPSPEED_UNAVAILABLE", {})
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator())
    O._register_deepspeed_optimizers()

    assert "fused_adam" not in O.AVAILABLE_OPTIMIZERS and "cpu_adam" in O.AVAILABLE_OPTIMIZERS
    msg = _err(O.build_optimizer, _tiny_model(), {"name": "fused_adam", "lr": 1e-3})
    assert msg.startswith("model.optim.name: optimizer 'fused_adam' is not available on this machine: ")
    assert "FusedAdamBuilder reports it incompatible" in msg and "requires a C++ compiler with AVX2" in msg
    assert "adamw" in msg  # what is available instead
    assert "C++ compiler" in _err(O.get_optimizer, "FUSED_ADAM")
