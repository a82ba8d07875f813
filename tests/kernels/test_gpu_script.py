"""The one-shot GPU check script must at least run end to end; on CPU it does so with --tiny."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu" / "kernels_check.py"


@pytest.mark.slow
def test_kernels_check_tiny_runs_clean():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all ok: 0 failure(s)" in proc.stdout
    assert "paged decode attention" in proc.stdout and "extend attention" in proc.stdout
