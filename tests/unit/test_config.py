"""Config loading: schema closure, precedence (CLI > YAML > dataclass), experiments, cross-key validation."""
import os

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from megatron_ext.config.loader import check_schema, load_config, register_schemas, validate_config
from megatron_ext.config.schema import GPTConfig
from megatron_ext.errors import ConfigError
from megatron_ext.training.engine import build_ds_config

from helpers import REPO

GPT_DIR = os.path.join(REPO, "configs", "gpt")
register_schemas()


def _compose(overrides=(), name="megatron_gpt_config"):
    with initialize_config_dir(config_dir=GPT_DIR, version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def test_precedence_cli_over_yaml_over_dataclass():
    assert GPTConfig().model.hidden_size == 128  # dataclass default
    cfg = _compose()
    assert cfg.model.hidden_size == 192  # YAML beats dataclass
    assert cfg.model.layernorm_epsilon == GPTConfig().model.layernorm_epsilon  # not in YAML -> dataclass
    cfg = _compose(["model.hidden_size=96"])
    assert cfg.model.hidden_size == 96  # CLI beats YAML


def test_experiment_group_and_cli_on_top():
    cfg = _compose(["+experiment=gpt_125m"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.trainer.precision) == (12, 768, "bf16")
    cfg = _compose(["+experiment=gpt_125m", "model.num_layers=3"])
    assert cfg.model.num_layers == 3
    for name in ("gpt_350m", "gpt_1p3b", "cpu_smoke"):
        c = _compose([f"+experiment={name}"])
        OmegaConf.to_container(c, resolve=True)


@pytest.mark.parametrize("override", ["model.hiden_size=64", "trainer.max_step=3"])
def test_unknown_key_is_error_naming_it(override):
    with pytest.raises(ConfigCompositionException) as ei:
        _compose([override])
    key = override.split("=")[0].split(".")[-1]
    assert key in str(ei.value) + str(ei.value.__cause__)


def test_plus_override_of_unknown_key_is_caught_by_schema_check():
    cfg = _compose(["+model.hiden_size=64"])  # Hydra lets '+' add keys ...
    with pytest.raises(ConfigError, match="hiden_size"):  # ... the schema check does not
        check_schema(cfg)
    check_schema(_compose(["++model.optim.momentum=0.9"]))  # optim keys are open (checked by the registry)


def test_unknown_key_in_yaml_is_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  num_layer: 3\n")
    with pytest.raises(ConfigError, match="num_layer"):
        load_config(yaml_path=str(p))


def test_wrong_type_is_error():
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(overrides=["model.num_layers=abc"])


def _cfg(**over):
    return load_config(overrides=[f"{k}={v}" for k, v in over.items()])


def test_global_batch_divisibility_message():
    cfg = _cfg(**{"model.global_batch_size": 10, "model.micro_batch_size": 4})
    with pytest.raises(ConfigError) as ei:
        validate_config(cfg, world_size=1, on_cuda=False)
    msg = str(ei.value)
    assert "model.global_batch_size (10)" in msg and "model.micro_batch_size (4)" in msg and "data_parallel_size (1)" in msg


def test_global_batch_divisibility_with_dp():
    cfg = _cfg(**{"model.global_batch_size": 12, "model.micro_batch_size": 4, "trainer.devices": 2})
    with pytest.raises(ConfigError, match="data_parallel_size \\(2\\)"):
        validate_config(cfg, world_size=2, on_cuda=False)
    cfg = _cfg(**{"model.global_batch_size": 16, "model.micro_batch_size": 4, "trainer.devices": 2})
    d = validate_config(cfg, world_size=2, on_cuda=False)
    assert (d.data_parallel_size, d.accumulate_grad_batches) == (2, 2)


def test_accumulate_grad_batches_must_agree():
    cfg = _cfg(**{"model.global_batch_size": 16, "model.micro_batch_size": 4, "trainer.accumulate_grad_batches": 2})
    with pytest.raises(ConfigError, match="set it to 4"):
        validate_config(cfg, world_size=1, on_cuda=False)


def test_other_validation_errors():
    with pytest.raises(ConfigError, match="trainer.precision"):
        validate_config(_cfg(**{"trainer.precision": "fp8"}), 1, False)
    with pytest.raises(ConfigError, match="needs a GPU"):
        validate_config(_cfg(**{"trainer.precision": 16}), 1, False)
    with pytest.raises(ConfigError, match="model.ckpt_path"):
        validate_config(_cfg(**{"trainer.limit_train_batches": 0}), 1, False)
    with pytest.raises(ConfigError, match="trainer.devices"):
        validate_config(_cfg(**{"trainer.devices": 2}), 1, False)
    with pytest.raises(ConfigError, match="model.zero_stage"):
        validate_config(_cfg(**{"model.zero_stage": 4}), 1, False)


def test_deepspeed_json_merge_and_conflicts(tmp_path):
    base = dict(micro_batch_size=2, global_batch_size=8, accumulate_grad_batches=4, precision="32")
    p = tmp_path / "ds.json"
    p.write_text('{"zero_optimization": {"stage": 2, "overlap_comm": true}, "train_micro_batch_size_per_gpu": 2}')
    ds = build_ds_config(**base, deepspeed_config=str(p))
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 4
    p.write_text('{"train_batch_size": 16}')
    with pytest.raises(ConfigError, match="train_batch_size=16"):
        build_ds_config(**base, deepspeed_config=str(p))
    p.write_text('{"optimizer": {"type": "Adam"}}')
    with pytest.raises(ConfigError, match="model.optim"):
        build_ds_config(**base, deepspeed_config=str(p))
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(**base, deepspeed_config=str(p))


def test_pipeline_and_zero_offload_checks():
    with pytest.raises(ConfigError, match="model.zero_stage=2 cannot be combined with model.pipeline_model_parallel"):
        validate_config(_cfg(**{"model.pipeline_model_parallel_size": 2, "model.zero_stage": 2,
                                "trainer.devices": 2}), 2, False)
    with pytest.raises(ConfigError, match="model.num_layers=2 is smaller than model.pipeline_model_parallel_size=4"):
        validate_config(_cfg(**{"model.pipeline_model_parallel_size": 4, "model.num_layers": 2,
                                "trainer.devices": 4}), 4, False)
    d = validate_config(_cfg(**{"model.pipeline_model_parallel_size": 2, "model.zero_stage": 1,
                                "trainer.devices": 2}), 2, False)
    assert d.data_parallel_size == 1
    base = dict(micro_batch_size=2, global_batch_size=8, accumulate_grad_batches=4, precision="32")
    ds = build_ds_config(**base, zero_stage=3, offload_optimizer="cpu", offload_param="cpu")
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ConfigError, match="model.offload_param=cpu needs model.zero_stage >= 3"):
        build_ds_config(**base, zero_stage=2, offload_param="cpu")
    with pytest.raises(ConfigError, match="model.offload_optimizer=cpu needs model.zero_stage >= 1"):
        build_ds_config(**base, zero_stage=0, offload_optimizer="cpu")
    with pytest.raises(ConfigError, match="model.offload_optimizer='gpu': expected null, 'cpu' or 'nvme'"):
        build_ds_config(**base, zero_stage=1, offload_optimizer="gpu")
    with pytest.raises(ConfigError, match="nvme_path"):
        build_ds_config(**base, zero_stage=3, offload_param="nvme")


# ------------------------------------------------------------------ the config is checked once, before any process
@pytest.fixture
def no_process_group():
    """No process group and no megatron-core parallel state in this process during the test (one an earlier test of
    the session made is taken down first and made again after, at the same sizes)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ext.parallel.state import destroy_parallel, init_distributed, initialize_parallel

    sizes = None
    if ps.model_parallel_is_initialized():
        sizes = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    had_dist = dist.is_initialized()
    destroy_parallel()
    yield
    destroy_parallel()
    if sizes is not None:
        initialize_parallel(*sizes, accelerator="cpu")
    elif had_dist:
        init_distributed("cpu")


def _no_groups():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return not dist.is_initialized() and not ps.model_parallel_is_initialized() and \
        ps.get_tensor_model_parallel_group(check_initialized=False) is None


def test_tp_not_dividing_heads_fails_in_the_config_check_before_any_process_group(no_process_group):
    from megatron_ext.config.loader import check_config
    from megatron_ext.parallel.launch import maybe_self_launch

    cfg = load_config(overrides=["trainer.devices=2", "model.tensor_model_parallel_size=2",
                                 "model.num_attention_heads=3", "model.hidden_size=48"])
    want = r"model\.num_attention_heads=3: must be divisible by model\.tensor_model_parallel_size=2"
    with pytest.raises(ConfigError, match=want):
        check_config(cfg)
    assert _no_groups()
    with pytest.raises(ConfigError, match=want):  # the entry points' first call: before any worker starts
        maybe_self_launch(cfg)
    assert _no_groups()


@pytest.mark.parametrize("schema, overrides, key", [
    ("gpt", ["model.arch=rnn"], "model.arch"),
    ("gpt", ["model.arch=mega", "model.mega.chunk_size=0"], "model.mega.chunk_size"),
    ("gpt", ["model.arch=mega", "model.mega.activation=gelu2"], "model.mega.activation"),
    ("gpt", ["model.activation=relu"], "model.activation"),
    ("gpt", ["model.position_embedding_type=rope", "model.hidden_size=36", "model.num_attention_heads=4"],
     "model.hidden_size"),
    ("gpt", ["model.sequence_parallel=true"], "model.sequence_parallel"),
    ("bart", ["model.encoder.arch=perceiver", "model.encoder.hidden_steps=0"], "model.encoder.hidden_steps"),
    ("bart", ["model.decoder.arch=perceiver"], "model.decoder.arch"),
    ("bart", ["model.decoder.hidden_size=64"], "model.encoder.hidden_size"),
])
def test_model_config_errors_come_from_the_config_check(no_process_group, schema, overrides, key):
    """Checks that used to run only when the model was built (after the process group and the datasets)."""
    from megatron_ext.config.loader import check_config
    from megatron_ext.config.schema import BARTConfig

    sch = BARTConfig if schema == "bart" else GPTConfig
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_config(load_config(sch, overrides=overrides), sch)
    assert _no_groups()


def test_typed_model_config_is_checked_at_construction():
    from megatron_ext.config.schema import EncoderDecoderModelConfig, ModelConfig, TransformerStackConfig

    with pytest.raises(ConfigError, match=r"model\.num_attention_heads=3: must be divisible by "
                                          r"model\.tensor_model_parallel_size=2"):
        ModelConfig(hidden_size=48, num_attention_heads=3, tensor_model_parallel_size=2)
    with pytest.raises(ConfigError, match=r"model\.encoder\.num_attention_heads=3"):
        EncoderDecoderModelConfig(encoder=TransformerStackConfig(hidden_size=48, num_attention_heads=3),
                                  decoder=TransformerStackConfig(hidden_size=48, num_attention_heads=4),
                                  tensor_model_parallel_size=2)
    ModelConfig(hidden_size=48, num_attention_heads=4, tensor_model_parallel_size=2)  # a good one is accepted


def test_building_a_model_creates_no_process_group(no_process_group):
    from megatron_ext.config.schema import ModelConfig
    from megatron_ext.models.gpt import GPTModel

    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, seq_length=16)
    with pytest.raises(ConfigError, match=r"initialize_parallel\(1, \.\.\.\) before building the model"):
        GPTModel(cfg, 64, init_seed=0)
    assert _no_groups()


def test_allowed_values_are_defined_once_in_config():
    from megatron_ext.config import model_validation as mv
    from megatron_ext.modules import mega, mega_ema, mlp, norms

    assert mega.MEGA_NORMALIZATIONS is mv.MEGA_NORMALIZATIONS
    assert mega.MEGA_ATTENTION_ACTIVATIONS is mv.MEGA_ATTENTION_ACTIVATIONS
    assert mega.MEGA_RELATIVE_POSITIONAL_BIASES is mv.MEGA_RELATIVE_POSITIONAL_BIASES
    assert mega.MEGA_ACTIVATIONS is mv.MEGA_ACTIVATIONS
    assert mega_ema.EMA_IMPL_CHOICES is mv.EMA_IMPL_CHOICES
    assert mlp.ACTIVATIONS is mv.ACTIVATIONS and norms.NORMALIZATIONS is mv.NORMALIZATIONS
