"""The config error of an entry point's command line (a subprocess): an unknown key is named."""
from megatron_ext.config.loader import register_schemas


register_schemas()


def test_unknown_key_from_cli_message(run_env):
    from helpers import run_script

    r = run_script(["pretrain_gpt.py", "model.hiden_size=64"], run_env, timeout=120)
    assert r.returncode != 0
    assert "hiden_size" in r.stderr
    assert "Traceback" not in r.stderr
