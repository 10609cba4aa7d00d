"""DeepSpeed engine construction (megatron_ext.training.engine): our fp32 clipping and the DP=1 all-reduce skip."""
import pytest
import torch

import megatron_ext  # noqa: F401  (sets DS_ACCELERATOR before deepspeed is imported)
from megatron_ext.config.schema import ModelConfig
from megatron_ext.models.gpt import GPTModel
from megatron_ext.parallel.random import model_parallel_manual_seed
from megatron_ext.parallel.state import initialize_parallel
from megatron_ext.training.engine import build_ds_config, build_engine, model_parallel_grad_norm

VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def _tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    yield


def _model(seed=0):
    torch.manual_seed(seed)
    model_parallel_manual_seed(seed, tp_rank=0, pp_rank=0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, hidden_dropout=0.0,
                      attention_dropout=0.0, make_vocab_size_divisible_by=8)
    return GPTModel(cfg, VOCAB)


def _engine(model, clip, zero_stage=0, precision="32"):
    opt = torch.optim.SGD(model.parameters(), lr=0.1) if zero_stage == 0 else torch.optim.AdamW(model.parameters())
    ds = build_ds_config(micro_batch_size=2, global_batch_size=2, accumulate_grad_batches=1, precision=precision,
                         zero_stage=zero_stage, gradient_clip_val=clip)
    engine, _, _ = build_engine(model, opt, None, ds)
    return engine


def _batch():
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, VOCAB, (2, 17), generator=g)
    return t[:, :-1], t[:, 1:]


def _reference_step(clip):
    """Plain PyTorch: same model, SGD, torch's clip_grad_norm_."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch()
    model(x, labels=y).mean().backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else float("inf")))
    opt.step()
    return model, norm


@pytest.mark.parametrize("clip", [0.0, 0.05, 1e6])
def test_fp32_clipping_matches_torch(clip):
    ref_model, ref_norm = _reference_step(clip)
    model = _model()
    engine = _engine(model, clip)
    assert engine.gradient_clipping() == 0.0  # DeepSpeed's own clipping is off: ours runs
    engine.mext_want_norm = True
    x, y = _batch()
    engine.backward(engine(x, labels=y).mean())
    engine.step()
    assert engine.mext_grad_norm == pytest.approx(ref_norm, rel=1e-5)
    if clip:
        assert (ref_norm > clip) == (clip == 0.05)  # one case clips, one does not
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_norm_only_on_demand_without_clipping():
    engine = _engine(_model(), 0.0)
    x, y = _batch()
    engine.backward(engine(x, labels=y).mean())
    engine.step()
    assert engine.mext_grad_norm is None
    engine.mext_want_norm = True
    engine.backward(engine(x, labels=y).mean())
    engine.step()
    assert engine.mext_grad_norm > 0


def test_model_parallel_grad_norm_single_rank():
    model = _model()
    x, y = _batch()
    model(x, labels=y).mean().backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).double().norm()
    torch.testing.assert_close(model_parallel_grad_norm(model), expected, rtol=1e-6, atol=0.0)


def test_single_replica_skips_deepspeed_allreduce_only_without_zero():
    assert _engine(_model(), 1.0, zero_stage=0).enable_backward_allreduce is False
    z1 = _engine(_model(), 1.0, zero_stage=1)
    assert z1.enable_backward_allreduce is True  # ZeRO's reduce also fills its partitions
    assert not hasattr(z1, "mext_grad_norm")  # ZeRO clips (and records the norm) itself


def test_changed_deepspeed_internals_fail_loudly(monkeypatch):
    """A DeepSpeed whose engine lacks a member we patch stops with one error naming the version and the member,
    instead of training on without our clipping / all-reduce skip."""
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine

    from megatron_ext.errors import MegatronExtError
    from megatron_ext.training.engine import TESTED_DEEPSPEED, DeepSpeedInternalsError

    monkeypatch.delattr(DeepSpeedEngine, "_take_model_step")
    with pytest.raises(DeepSpeedInternalsError) as info:
        _engine(_model(), 1.0)
    msg = str(info.value)
    assert isinstance(info.value, MegatronExtError)  # an entry point prints it on one line, exit status 2
    assert f"DeepSpeed {deepspeed.__version__}" in msg and "DeepSpeedEngine has no attribute '_take_model_step'" in msg
    assert "gradient clipping" in msg and TESTED_DEEPSPEED in msg
    monkeypatch.undo()

    # an attribute that is set, not called: a renamed one would be set in vain, so its absence is refused too
    for attr, purpose in (("enable_backward_allreduce", "all-reduce"), ("checkpoint_engine", "safe loader")):
        monkeypatch.setattr(DeepSpeedEngine, "__init__", _without(attr, DeepSpeedEngine.__init__))
        with pytest.raises(DeepSpeedInternalsError, match=f"no attribute '{attr}'.*{purpose}"):
            _engine(_model(), 1.0)
        monkeypatch.undo()


def _without(attr, init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        delattr(self, attr)  # as if DeepSpeed had renamed it

    return wrapped
