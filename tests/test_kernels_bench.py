"""The two benchmark scripts run end to end in their CPU smoke mode and write sane JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the smoke mode even on a GPU machine
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), "--cpu-smoke", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
    )  # fmt: skip


def test_bench_msda_cpu_smoke(tmp_path):
    out = tmp_path / "msda.json"
    result = run_script("bench_msda.py", out)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["environment"]["smoke"] is True and data["copy_bandwidth_GBps"] > 0
    cases = data["cases"]
    assert {c["call"] for c in cases} == {"encoder", "decoder"}
    assert {c["locations"] for c in cases} == {"train", "uniform", "concentrated"}
    for case in cases:
        for impl, modes in case["timings"].items():
            for mode in ("fwd", "bwd", "fwd+bwd"):
                assert modes[mode]["median_us"] > 0 and modes[mode]["hbm_roofline_pct"] > 0
        assert case["memory"]["grid_sample"]["saved_for_backward_MB"] > 0
    # The interpreted kernels ran, matched the fp32 oracle and kept nothing beyond their inputs.
    triton_cases = [c for c in cases if "triton" in c["timings"]]
    assert len(triton_cases) == 1
    assert all(v["ok"] for v in triton_cases[0]["correctness"]["triton"].values())
    assert triton_cases[0]["memory"]["triton"]["saved_for_backward_MB"] == 0
    assert "grid_sample" in result.stdout and "fwd+bwd" in result.stdout


def test_bench_train_step_cpu_smoke(tmp_path):
    out = tmp_path / "step.json"
    result = run_script("bench_train_step.py", out)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["smoke"] is True
    assert set(data["variants"]) == {"torch/dac_on", "torch/dac_off"}
    for variant in data["variants"].values():
        assert variant["step_ms_median"] > 0
    assert "torch/dac_on" in result.stdout


def test_roofline_bytes_and_location_sets_at_the_real_shapes():
    """The benchmark's compulsory-traffic formula reproduces docs/kernels.md, Shapes and minimum
    traffic (encoder and decoder, B = 2, bf16 value: forward 114 / 27 MB, backward with zero-fill
    and cast 341 / 190 MB), and every location set is built at the real shapes with its share of
    samples off the maps."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_msda
    finally:
        sys.path.pop(0)
    import torch

    expected = {"encoder": (114, 341), "decoder": (27, 190)}
    for call, (fwd_mb, bwd_mb) in expected.items():
        for dist in ("train", "uniform", "concentrated"):
            case = bench_msda.make_case(call, "bf16", dist, 2, bench_msda.ENCODER_LEVELS, bench_msda.DECODER_QUERIES,
                                        torch.device("cpu"))  # fmt: skip
            assert case.loc.shape == (2, 22223 if call == "encoder" else 1100, 8, 4, 4, 2)
            off_map = ((case.loc < 0) | (case.loc > 1)).any(-1).float().mean().item()
            assert 0.005 < off_map < 0.2, (call, dist, off_map)
            torch.testing.assert_close(case.weights.sum((-1, -2)), torch.ones(case.weights.shape[:3]))
        nbytes = bench_msda.compulsory_bytes(case)
        assert round(nbytes["fwd"] / 1e6) == fwd_mb and round(nbytes["bwd"] / 1e6) == bwd_mb, nbytes
