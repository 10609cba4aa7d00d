"""Hugging Face export end to end: pretrain_gpt.py (in-process) -> tools/convert_to_hf.py (a subprocess) -> the HF
model's logits equal ours."""
import pytest
import torch

from helpers import TOL, VOCAB, fit_in_process, hf_logits, our_logits, run_script
from megatron_ext.models.gpt import GPTModel

transformers = pytest.importorskip("transformers")


def test_end_to_end_from_training_checkpoint(run_env, tmp_path, in_process):
    """pretrain_gpt.py (byte tokenizer, built-in corpus, a few steps) -> tools/convert_to_hf.py --input <run dir>
    -> the HF model's logits equal our model's loaded from the same checkpoint."""
    from omegaconf import OmegaConf

    from megatron_ext.config.loader import check_schema
    from megatron_ext.config.schema import GPTConfig
    from megatron_ext.tokenizers import ByteTokenizer

    fit_in_process(["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                    "model.seq_length=32", "model.micro_batch_size=2", "model.global_batch_size=2",
                    "model.position_embedding_type=rope", "model.activation=swiglu", "model.normalization=rmsnorm",
                    "model.bias=false", "model.share_embeddings_and_output_weights=false",
                    "trainer.max_steps=2", "trainer.val_check_interval=0", "trainer.log_every_n_steps=1",
                    "exp_manager.create_tensorboard_logger=false", f"exp_manager.exp_dir={tmp_path}",
                    "exp_manager.version=v0"])  # training in this process; the export through the tool's CLI
    run_dir = tmp_path / "megatron_gpt" / "v0"
    out = tmp_path / "hf"
    r = run_script(["tools/convert_to_hf.py", "--input", str(run_dir), "--output", str(out)], run_env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "LlamaForCausalLM (step 2)" in r.stdout and "byte tokenizer, tokenizer exact" in r.stdout

    # our model, straight from the checkpoint's model states (no consolidation code involved)
    typed = check_schema(OmegaConf.load(run_dir / "config.yaml"), GPTConfig)
    mcfg = OmegaConf.to_object(typed.model)
    model = GPTModel(mcfg, VOCAB, init_seed=0).eval()
    states = torch.load(run_dir / "checkpoints" / "step_0000002" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    model.load_state_dict({k: v for k, v in states.items() if not k.endswith("_extra_state")})
    text = "def main():\n    return 0  # héllo"
    ours = ByteTokenizer()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == ours.tokenize(text)
    _, got = hf_logits(str(out), ids)
    ref = our_logits(model, ids)
    diff = (got - ref).abs().max().item()
    print(f"end to end (llama, trained 2 steps): max |logits diff| = {diff:.3e}")
    assert diff <= TOL
