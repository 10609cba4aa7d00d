"""The one model-family table (megatron_ext/models/families.py): the rule for configs, checkpoints and model objects,
the schemas the entry points check, and its users (hf_export, the run loader's tasks) asking it rather than deciding."""
import pytest
import torch
from omegaconf import OmegaConf

from megatron_ext.config.loader import check_schema, load_config
from megatron_ext.config.schema import BARTConfig, GPTConfig
from megatron_ext.errors import ConfigError
from megatron_ext.inference.hf_export import resolve_arch
from megatron_ext.inference.runs import TASKS
from megatron_ext.models.families import FAMILIES, family_of_config, family_of_model, get_family

pytestmark = pytest.mark.usefixtures("tp1_one_thread")


@pytest.mark.parametrize("section, name", [
    ({}, "gpt"),
    ({"arch": "transformer"}, "gpt"),
    ({"arch": "MEGA"}, "mega"),
    ({"encoder": {"num_layers": 2}, "decoder": {"num_layers": 2}}, "encdec"),
    ({"encoder": {"arch": "perceiver"}}, "encdec"),  # BART's schema fills the decoder from its defaults
    ({"decoder": {"arch": "mega"}}, "encdec"),
])
def test_which_family_a_model_section_is(section, name):
    assert family_of_config(section).name == name
    assert family_of_config(OmegaConf.create(section)).name == name


def test_encoder_or_decoder_alone_is_what_the_bart_schema_accepts_and_the_gpt_schema_refuses():
    for side in ("encoder", "decoder"):
        cfg = OmegaConf.create({"model": {side: {"num_layers": 1}}})
        typed = check_schema(cfg, BARTConfig)  # the other side comes from the schema's defaults
        assert family_of_config(typed.model).name == "encdec"
        with pytest.raises(ConfigError, match=side):
            check_schema(cfg, GPTConfig)


def test_an_unknown_arch_is_named():
    with pytest.raises(ConfigError, match=r"model.arch='lstm': expected one of transformer, mega"):
        family_of_config({"arch": "lstm"})
    with pytest.raises(ConfigError, match=r"family='rnn': expected one of encdec, mega, gpt"):
        get_family("rnn")


def test_typed_configs_of_both_entry_points():
    assert family_of_config(load_config().model).name == "gpt"
    assert family_of_config(load_config(overrides=["model.arch=mega"]).model).name == "mega"
    assert family_of_config(OmegaConf.structured(BARTConfig).model).name == "encdec"


def test_each_builder_gives_its_class_and_the_model_maps_back():
    gpt = load_config(overrides=["model.num_layers=1", "model.hidden_size=16", "model.num_attention_heads=2",
                                 "model.seq_length=16"])
    mega = load_config(overrides=["model.arch=mega", "model.num_layers=1", "model.hidden_size=16",
                                  "model.seq_length=16", "model.mega.ema_projection_size=2",
                                  "model.mega.shared_representation_size=8"])
    bart = check_schema(OmegaConf.create({"model": {
        "seq_length": 16, "encoder": {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2},
        "decoder": {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2}}}), BARTConfig)
    for cfg, name in ((gpt, "gpt"), (mega, "mega"), (bart, "encdec")):
        fam = family_of_config(cfg.model)
        assert fam.name == name and fam.schema is (BARTConfig if name == "encdec" else GPTConfig)
        tok = fam.build_tokenizer(cfg.model.tokenizer)
        model = fam.build(cfg.model, tok.vocab_size, init_seed=1)
        assert type(model) is fam.model_class
        assert family_of_model(model) is fam
    assert getattr(FAMILIES["encdec"].build_tokenizer(bart.model.tokenizer), "mask", None) is not None
    with pytest.raises(TypeError, match="not one of the model classes"):
        family_of_model(torch.nn.Linear(2, 2))


def test_the_users_of_the_table_agree_with_it():
    assert set(TASKS) == set(FAMILIES)  # inference/runs.py: one training task per family
    with pytest.raises(ConfigError, match="encoder-decoder"):
        resolve_arch({}, "auto", family_of_config({"decoder": {}}).name)
    assert resolve_arch({}, "auto", family_of_config({"arch": "mega"}).name) == "mega"  # HF MegaForCausalLM
    assert resolve_arch({}, "auto", family_of_config({}).name) == "gpt2"
