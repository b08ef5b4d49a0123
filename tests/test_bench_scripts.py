"""The step benchmark runs and reports each variant against the first (a smoke check: timings are
for a quiet machine, not for CI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from test_train_helpers import tiny_data_overrides

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_bench_step_overrides_compares_variants_side_by_side(tmp_path):
    data = " ".join(tiny_data_overrides(tmp_path / "data"))
    variants = [f"{data} optimizer.fused=false", data]
    result = subprocess.run(
        [sys.executable, str(SCRIPTS / "bench_step_overrides.py"), "--threads", "1", "--rounds", "1", "--steps", "1",
         *variants],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| data=")]
    assert len(rows) == 2 and rows[0].endswith("| 1.00x |"), result.stdout
    assert "1 thread(s)" in result.stdout


def test_bench_step_overrides_needs_two_variants():
    result = subprocess.run([sys.executable, str(SCRIPTS / "bench_step_overrides.py"), "--threads", "1", ""],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "at least two variants" in result.stderr
