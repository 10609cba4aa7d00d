"""tools/preprocess_data.py as a subprocess: exit status and summary line."""
import os
import subprocess

import helpers
from helpers import REPO


SCRIPT = os.path.join(REPO, "tools", "preprocess_data.py")


def test_cli_subprocess_exit_code_and_summary(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text('{"text": "fine"}\n{"text": oops}\n')
    proc = subprocess.run([helpers.PYTHON, SCRIPT, "--input", str(f), "--output-prefix",
                           str(tmp_path / "o"), "--workers", "2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{f}, line 2: not valid JSON" in proc.stderr
