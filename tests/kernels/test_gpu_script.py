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


@pytest.mark.slow
def test_engine_bench_tiny_reports_against_floors_measured_in_the_run(tmp_path):
    """engine_bench --tiny on CPU: the floors come from this run's own measurement (recorded in the
    JSON, the rows' floors computed from them), and every row has a time."""
    import json

    script = SCRIPT.parent / "engine_bench.py"
    out = tmp_path / "engine_bench.json"
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--json", str(out), "--budget-s", "120"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["gpu"] == "cpu" and meta["copy_bytes_per_s"] > 0 and meta["matmul_flops"] > 0
    assert data["errors"] == [] and data["ooms"] == []
    prefill = next(r for r in data["rows"] if r["case"] == "prefill 32" and r["impl"] == "pdserve eager")
    sys.path.insert(0, str(SCRIPT.parent))
    from floors import prefill_flops
    from engine_bench import ARCHS
    assert prefill["floor_ms"] == pytest.approx(prefill_flops(ARCHS["tiny"], 32) / meta["matmul_flops"] * 1e3)
    assert all(r["ms"] for r in data["rows"]) and len(data["rows"]) >= 12
