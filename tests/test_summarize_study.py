"""scripts/summarize_study.py on fabricated metric files: table values, the page block, the PNGs."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "summarize_study.py"
COLUMNS = ["epoch", "step", "train/loss", "val/mAP", "val/mAP_50", "val/mAP_75", "val/mAP_s", "val/mAP_m", "val/mAP_l",
           "val/queries_per_object@0.6", "val/queries_per_object@0.7", "val/queries_per_object@0.8"]


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("summarize_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, key: str, record: dict, final_map: float, epochs: int = 3, qpo6: float = 2.0) -> None:
    """A Lightning-CSVLogger-like file: train rows without val columns, one val row per epoch."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{key}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for e in range(epochs):
            writer.writerow({"epoch": e, "step": 10 * e + 5, "train/loss": 3.0 - e})  # a train row: no val/mAP
            m = final_map * (e + 1) / epochs
            writer.writerow({"epoch": e, "step": 10 * e + 9, "val/mAP": m, "val/mAP_50": 1.5 * m, "val/mAP_75": 0.8 * m,
                             "val/mAP_s": 0.5 * m, "val/mAP_m": m, "val/mAP_l": -1.0,
                             "val/queries_per_object@0.6": qpo6 * (e + 1) / epochs,
                             "val/queries_per_object@0.7": 1.0, "val/queries_per_object@0.8": 0.5})
    (folder / f"{key}.json").write_text(json.dumps({**record, "max_epochs": epochs, "overrides": []}))


def fabricate(root: Path) -> Path:
    runs = root / "runs"
    finals = {"dac": [0.30, 0.34], "baseline": [0.20, 0.22], "dac_cdn": [0.25, 0.25]}
    for arm, values in finals.items():
        for seed, value in zip((1, 2), values):
            write_run(runs / "arms", f"{arm}_seed{seed}", {"arm": arm, "seed": seed, "threshold": 0.4, "topk": 6}, value,
                      qpo6=4.0 if arm != "baseline" else 2.0)
    for i, t in enumerate((0.3, 0.4, 0.5)):
        for j, k in enumerate((4, 6, 8)):
            write_run(runs / "ablation", f"thr{t:g}_topk{k}", {"arm": "dac", "seed": 1, "threshold": t, "topk": k},
                      0.1 + 0.01 * i + 0.001 * j)
    return runs


def test_tables_plots_and_page(tmp_path, summary):
    runs = fabricate(tmp_path)
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text(f"# Results\n\nhand-written intro\n\n{summary.BEGIN}\nold\n{summary.END}\n\nhand-written outro\n")
    figures = tmp_path / "docs" / "figures"
    assert summary.main(["--runs", str(runs), "--page", str(page), "--figures", str(figures)]) == 0

    text = page.read_text()
    assert "hand-written intro" in text and "hand-written outro" in text and "\nold\n" not in text
    # dac: final AP 30 and 34 -> mean 32.0, sample std 2.83; AP50 = 1.5x -> 48.0 ± 4.2
    dac_row = next(line for line in text.splitlines() if line.startswith("| `dac` |"))
    cells = [c.strip() for c in dac_row.strip("|").split("|")]
    assert cells[1] == "1, 2"
    assert cells[2] == "32.0 ± 2.8" and cells[3] == "48.0 ± 4.2" and cells[4] == "25.6 ± 2.3"
    assert cells[7] == "n/a"  # COCO's APl -1: no large objects
    assert cells[8] == "4.00 ± 0.00" and cells[9] == "1.00 ± 0.00" and cells[10] == "0.50 ± 0.00"
    baseline_row = next(line for line in text.splitlines() if line.startswith("| `baseline` |"))
    assert "21.0 ± 1.4" in baseline_row and "2.00 ± 0.00" in baseline_row
    # per-seed table and the 3 x 3 ablation grid (threshold rows, top-k columns)
    assert "| 2 | 34.0 | 22.0 | 25.0 |" in text
    assert "| 0.3 | 10.0 | 10.1 | 10.2 |" in text and "| 0.5 | 12.0 | 12.1 | 12.2 |" in text
    for name in ("study_map.png", "study_queries_per_object.png", "study_ablation.png"):
        png = figures / name
        assert png.is_file() and png.stat().st_size > 5000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{name}" in text

    # Regenerating from the same files gives the same page.
    before = page.read_text()
    summary.main(["--runs", str(runs), "--page", str(page), "--figures", str(figures)])
    assert page.read_text() == before


def test_collect_takes_finished_jobs_only(tmp_path, summary):
    """--collect copies a finished multirun job's metrics and skips one that has not finished."""
    from omegaconf import OmegaConf

    log_dir = tmp_path / "logs"
    for job, epochs_done in (("0", 2), ("1", 1)):
        job_dir = log_dir / "study_arms" / "multiruns" / "2026-01-01_00-00-00" / job
        (job_dir / ".hydra").mkdir(parents=True)
        cfg = {"study_arm": "baseline", "seed": int(job) + 1, "trainer": {"max_epochs": 2},
               "dac": {"o2m": {"threshold": 0.4, "topk": 6}}}
        OmegaConf.save(OmegaConf.create(cfg), job_dir / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.create(["experiment=study/baseline", f"seed={int(job) + 1}"]), job_dir / ".hydra" / "overrides.yaml")
        write_run(job_dir / "csv" / "version_0", "metrics", {}, 0.2, epochs=epochs_done)
    runs = tmp_path / "runs"
    assert summary.collect(log_dir, runs) == 1
    record = json.loads((runs / "arms" / "baseline_seed1.json").read_text())
    assert record["arm"] == "baseline" and record["seed"] == 1 and record["overrides"][1] == "seed=1"
    loaded = summary.load_runs(runs, "arms")
    assert len(loaded) == 1 and math.isclose(loaded[0]["curve"]["val/mAP"][-1], 0.2)
    assert loaded[0]["epochs"] == [1, 2]


def test_no_runs_is_a_clear_error(tmp_path, summary):
    with pytest.raises(SystemExit, match="run_study.sh"):
        summary.summarize(tmp_path / "none", tmp_path / "results.md", tmp_path / "figures")


def test_default_ablation_cell_comes_from_the_arms(tmp_path, summary):
    """The grid's (0.4, 6) cell is the arms' dac run at the ablation's seed, unless the ablation ran it."""
    runs = tmp_path / "runs"
    write_run(runs / "arms", "dac_seed1", {"arm": "dac", "seed": 1, "threshold": 0.4, "topk": 6}, 0.31)
    write_run(runs / "arms", "dac_seed2", {"arm": "dac", "seed": 2, "threshold": 0.4, "topk": 6}, 0.99)
    write_run(runs / "ablation", "thr0.3_topk4", {"arm": "dac", "seed": 1, "threshold": 0.3, "topk": 4}, 0.2)
    assert summary.collect(tmp_path / "no_logs", runs) == 0
    cell = json.loads((runs / "ablation" / "thr0.4_topk6.json").read_text())
    assert cell["from_arms"] == "dac_seed1" and cell["seed"] == 1
    thresholds, topks, grid = summary.ablation_grid(summary.load_runs(runs, "ablation"))
    assert grid[thresholds.index(0.4)][topks.index(6)] == pytest.approx(31.0)
    # A cell the ablation ran itself is kept.
    write_run(runs / "ablation", "thr0.4_topk6", {"arm": "dac", "seed": 1, "threshold": 0.4, "topk": 6}, 0.5)
    summary.collect(tmp_path / "no_logs", runs)
    assert "from_arms" not in json.loads((runs / "ablation" / "thr0.4_topk6.json").read_text())
