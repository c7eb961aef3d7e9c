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
