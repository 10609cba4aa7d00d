"""Config errors of an entry point's command line (a subprocess): an unknown key is named; a bad architecture
stops before the training stack is imported."""
from megatron_ext.config.loader import register_schemas


register_schemas()


def test_unknown_key_from_cli_message(run_env):
    from helpers import run_script

    r = run_script(["pretrain_gpt.py", "model.hiden_size=64"], run_env, timeout=120)
    assert r.returncode != 0
    assert "hiden_size" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_model_config_exits_before_the_training_stack_is_imported(run_env, tmp_path):
    """pretrain_gpt.py with a bad architecture: exit 2 with one ``error:`` line, and neither megatron.core nor
    deepspeed (the training stack) was imported (``python -X importtime`` lists every import on stderr)."""
    from helpers import run_script

    r = run_script(["-X", "importtime", "pretrain_gpt.py", "model.arch=mega", "model.mega.chunk_size=0",
                    f"exp_manager.exp_dir={tmp_path}"], run_env, timeout=300)
    lines = r.stderr.splitlines()
    err = [line for line in lines if line.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1 and "model.mega.chunk_size" in err[0], r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    assert "torch" in imported  # the listing works
    assert not imported & {"megatron.core", "megatron.core.parallel_state", "deepspeed"}, sorted(imported)[:50]
    assert "Traceback" not in r.stderr and "[launch] starting" not in r.stderr
