"""The planner (megatron_ext/planning/planner.py): exact parameter counts against built models; the layout search
lists only layouts the run's own checks accept."""
import pytest

from helpers import compose_entry_config
from megatron_ext.config.loader import check_config, validate_config
from megatron_ext.config.schema import BARTConfig, GPTConfig
from megatron_ext.errors import ConfigError
from megatron_ext.models.families import family_of_config
from megatron_ext.parallel.state import initialize_parallel
from megatron_ext.planning.planner import Machine, plan, search

CPU = Machine(devices_per_node=1, cpu=True, host_memory_gb=8)


@pytest.fixture(autouse=True, scope="module")
def _tp1():
    initialize_parallel(1, 1, accelerator="cpu")
    yield


@pytest.mark.parametrize("overrides,bart", [
    ([], False),
    (["model.normalization=rmsnorm", "model.activation=swiglu", "model.position_embedding_type=rope",
      "model.share_embeddings_and_output_weights=false", "model.bias=false", "model.num_query_groups=2"], False),
    ([], True),
])
def test_parameter_count_matches_the_built_model(overrides, bart):
    if bart:
        cfg = check_config(compose_entry_config(overrides, "configs/bart", "megatron_bart_config"), BARTConfig)
    else:
        cfg = check_config(compose_entry_config(overrides), GPTConfig)
    fam = family_of_config(cfg.model)
    tok = fam.build_tokenizer(cfg.model.tokenizer)
    model = fam.build(cfg.model, tok.vocab_size, init_seed=1)
    pl = plan(cfg, CPU)
    n = sum(p.numel() for p in model.parameters())
    assert pl.params["total"] == n
    assert pl.params["per_rank_per_stage"] == [n]  # TP 1, PP 1
    assert len(pl.peak_bytes_per_rank) == 1 and pl.peak_bytes_per_rank[0] > 4 * n


def test_search_lists_only_valid_layouts_fastest_first():
    # 6 heads, 4 layers, global batch 16 on 2 x 4 devices: TP 4 (heads), PP 8 (layers), ZeRO >= 2 with PP,
    # micro-batches not dividing 16 / DP are all refused by validate_config and must never be listed
    cfg = check_config(compose_entry_config(["model.global_batch_size=24"]), GPTConfig)
    machine = Machine(devices_per_node=4, nodes=2, device_memory_gb=80)
    plans = search(cfg, machine, top=1000)
    assert plans
    times = [p.predicted_step_time_s for p in plans]
    assert times == sorted(times)
    seen = set()
    for p in plans:
        lay = p.layout
        assert 6 % lay["tp"] == 0 and lay["pp"] <= 4 and not (lay["pp"] > 1 and lay["zero_stage"] >= 2)
        assert 24 % (lay["micro_batch_size"] * lay["dp"]) == 0
        seen.add((lay["tp"], lay["pp"], lay["zero_stage"]))
        c = cfg.copy()
        c.trainer.devices, c.trainer.num_nodes = 4, 2
        c.model.tensor_model_parallel_size, c.model.pipeline_model_parallel_size = lay["tp"], lay["pp"]
        c.model.zero_stage, c.model.micro_batch_size = lay["zero_stage"], lay["micro_batch_size"]
        validate_config(c, 8, on_cuda=True)  # raises on a layout that violates a rule
    assert (2, 1, 3) in seen and (1, 2, 1) in seen and not any(tp == 4 for tp, _, _ in seen)


def test_refuses_a_layout_the_machine_cannot_hold():
    cfg = check_config(compose_entry_config(["model.tensor_model_parallel_size=3"]), GPTConfig)
    with pytest.raises(ConfigError, match="not divisible"):
        plan(cfg, Machine(devices_per_node=4))


def test_predicted_for_check_names_the_measured_kinds():
    # the figures measure.CollectiveCounter counted for this layout (bench/results/bench_plan_cpu.jsonl,
    # gpt_pp2_s256): pp_send / pp_recv of the 2 x 2 x 256 x 256 fp32 activations, the tied embedding's gradient
    from megatron_ext.planning.planner import predicted_for_check

    cfg = check_config(compose_entry_config(
        ["trainer.accelerator=cpu", "trainer.devices=2", "model.pipeline_model_parallel_size=2", "model.num_layers=4",
         "model.hidden_size=256", "model.num_attention_heads=8", "model.micro_batch_size=2",
         "model.global_batch_size=4", "model.seq_length=256"]), GPTConfig)
    for rank in (0, 1):
        pred = predicted_for_check(cfg, rank)
        assert pred["comm_bytes"]["pp_send"] == pred["comm_bytes"]["pp_recv"] == 2 * 2 * 256 * 256 * 4
        assert pred["comm_bytes"]["pp_sendrecv"] == 2 * pred["comm_bytes"]["pp_send"]
        assert pred["comm_bytes"]["pp_allreduce"] == 4 * plan(cfg, Machine(devices_per_node=2, cpu=True,
                                                                           host_memory_gb=8)).params[
            "padded_vocab_size"] * 256
        assert set(pred["comm_bytes"]) == {"pp_send", "pp_recv", "pp_sendrecv", "pp_allreduce"}
        assert pred["peak_bytes"] > 0
    # ZeRO 1 / 2 all-reduce the gradients (DeepSpeed 0.19), then all-gather the weights; ZeRO 3 reduce-scatters
    z = check_config(compose_entry_config(["trainer.accelerator=cpu", "trainer.devices=2", "model.zero_stage=2",
                                           "model.micro_batch_size=2", "model.global_batch_size=4"]), GPTConfig)
    assert set(predicted_for_check(z, 0)["comm_bytes"]) == {"dp_allreduce", "dp_allgather"}
    z.model.zero_stage = 3
    assert set(predicted_for_check(z, 1)["comm_bytes"]) == {"dp_reduce_scatter", "dp_allgather"}


def test_search_respects_every_divisibility_rule():
    # 8 heads, 4 query groups, SwiGLU fc of 198 (198 % 4 != 0), 3 layers, global batch 24 on 2 nodes x 4 devices:
    # TP 4 is refused by the FFN width only, PP 4 / 8 by the layers; each listed layout is checked by explicit
    # arithmetic and by validate_config (offload keys included)
    from megatron_ext.models.gpt import padded_vocab_size

    cfg = check_config(compose_entry_config([
        "model.num_attention_heads=8", "model.num_query_groups=4", "model.activation=swiglu",
        "model.ffn_hidden_size=198", "model.position_embedding_type=rope", "model.num_layers=3",
        "model.global_batch_size=24"]), GPTConfig)
    machine = Machine(devices_per_node=4, nodes=2, device_memory_gb=80)
    stats = {}
    plans = search(cfg, machine, top=10_000, vocab_size=259, stats=stats)
    assert plans and stats["fits"] == len(plans) and stats["evaluated"] >= len(plans)
    seen = set()
    for p in plans:
        lay = p.layout
        tp, pp, dp, zero, mb = lay["tp"], lay["pp"], lay["dp"], lay["zero_stage"], lay["micro_batch_size"]
        assert tp * pp * dp == 8 and 4 % tp == 0  # TP inside a node
        assert 8 % tp == 0 and 4 % tp == 0 and 198 % tp == 0  # heads, query groups, FFN
        assert 3 // pp >= 1  # every stage holds a layer
        assert 24 % (mb * dp) == 0 and lay["micro_batches"] == 24 // (mb * dp)
        assert not (pp > 1 and zero >= 2)
        assert not lay["offload_optimizer"] or zero >= 1
        assert not lay["offload_param"] or zero == 3
        V = p.params["padded_vocab_size"]
        assert V == padded_vocab_size(259, cfg.model.make_vocab_size_divisible_by, tp) >= 259
        assert V % (cfg.model.make_vocab_size_divisible_by * tp) == 0
        seen.add((tp, pp))
        c = cfg.copy()
        c.trainer.devices, c.trainer.num_nodes = 4, 2
        c.model.tensor_model_parallel_size, c.model.pipeline_model_parallel_size = tp, pp
        c.model.zero_stage, c.model.micro_batch_size = zero, mb
        c.model.offload_optimizer = "cpu" if lay["offload_optimizer"] else None
        c.model.offload_param = "cpu" if lay["offload_param"] else None
        c.model.activations_checkpoint_granularity = "full" if lay["checkpointing"] else None
        validate_config(c, 8, on_cuda=True)
    assert (2, 2) in seen and (1, 1) in seen and not any(tp == 4 or pp > 2 for tp, pp in seen)


def _saved_activation_bytes(model, forward) -> int:
    """Bytes of every distinct storage autograd saves for backward in ``forward()`` that is not a parameter."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() and st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


_GPT_SMALL = ["model.num_layers=2", "model.hidden_size=96", "model.num_attention_heads=4", "model.micro_batch_size=3",
              "model.global_batch_size=3", "model.seq_length=80"]
_BART_SMALL = ["model.encoder.num_layers=1", "model.encoder.hidden_size=96", "model.encoder.num_attention_heads=4",
               "model.decoder.num_layers=1", "model.decoder.hidden_size=96", "model.decoder.num_attention_heads=4",
               "model.micro_batch_size=3", "model.global_batch_size=3", "model.seq_length=80",
               "model.seq_length_dec=64"]
_NO_DROPOUT = [f"model.{side}.{k}=0" for side in ("encoder", "decoder") for k in ("hidden_dropout", "attention_dropout")]


@pytest.mark.parametrize("overrides,bart,bf16", [
    (_GPT_SMALL, False, False),
    (_GPT_SMALL, False, True),
    (_GPT_SMALL + ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"], False, False),
    (_GPT_SMALL + ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"], False, True),
    (_GPT_SMALL + ["model.activations_checkpoint_granularity=full"], False, False),
    (_GPT_SMALL + ["model.num_attention_heads=8", "model.num_query_groups=2", "model.activation=swiglu",
                   "model.normalization=rmsnorm", "model.position_embedding_type=rope"], False, True),
    (_BART_SMALL, True, False),
    (_BART_SMALL, True, True),
    (_BART_SMALL + _NO_DROPOUT, True, False),
])
def test_activation_bytes_are_what_autograd_saves(overrides, bart, bf16):
    # the planner's activations per micro-batch (module docstring of planner.py) against the bytes the built model's
    # forward actually saves for backward on this CPU, storage by storage (parameters excluded)
    import torch

    if bart:
        cfg = check_config(compose_entry_config(overrides, "configs/bart", "megatron_bart_config"), BARTConfig)
    else:
        cfg = check_config(compose_entry_config(overrides), GPTConfig)
    if bf16:
        cfg.trainer.precision = "bf16"
    fam = family_of_config(cfg.model)
    tok = fam.build_tokenizer(cfg.model.tokenizer)
    model = fam.build(cfg.model, tok.vocab_size, init_seed=1).to(torch.bfloat16 if bf16 else torch.float32).train()
    b, s = cfg.model.micro_batch_size, cfg.model.seq_length
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, tok.vocab_size, (b, s), generator=gen)
    if bart:
        y = torch.randint(0, tok.vocab_size, (b, cfg.model.seq_length_dec), generator=gen)
        saved = _saved_activation_bytes(model, lambda: model(x, y, torch.ones(b, s, dtype=torch.bool)))
    else:
        saved = _saved_activation_bytes(model, lambda: model(x))
    predicted = plan(cfg, CPU).bytes_per_rank["activations_per_microbatch_per_stage"][0]
    assert predicted == pytest.approx(saved, rel=0.02), (predicted, saved)
