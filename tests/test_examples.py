"""The example scripts run and say what they promise."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_mixed_batch_example_agrees_with_peft():
    result = subprocess.run([sys.executable, str(EXAMPLES / "mixed_batch.py"), "--model", "tiny-llava",
                             "--inner", "aot_eager"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "every request equals PEFT alone" in result.stdout and ": True" in result.stdout
    # Quiet: one summary line of ours, no torch._dynamo log lines, no deprecation noise.
    assert "mmlora_fx: compiled" in result.stderr
    assert "torch/_dynamo" not in result.stderr and "Warning" not in result.stderr, result.stderr[-2000:]
