"""Tables and plots of the DAC-vs-baseline study (docs/results.md) from the runs' CSV metrics.

    python scripts/summarize_study.py --collect logs/study   # copy finished runs' metrics, then summarise
    python scripts/summarize_study.py                        # summarise the committed metric files again

``--collect LOG_DIR`` reads the Hydra multirun folders that ``scripts/run_study.sh`` wrote
(``LOG_DIR/study_arms/multiruns/<time>/<job>`` and ``LOG_DIR/study_ablation/...``), and copies each
finished job's ``metrics.csv`` with a small JSON of what the job was (arm, seed, one-to-many
threshold and top-k, overrides) into ``docs/study/runs/{arms,ablation}/``. Those committed files
are the only input of the summary, so the page regenerates exactly from the repository.

The summary rewrites the generated block of ``docs/results.md`` (between the ``study:generated``
markers; the hand-written text around it is kept) and the PNGs in ``docs/figures/``:

- per arm, mean ± std over seeds of the final-epoch AP, AP50, AP75, APs/m/l and the
  queries-per-object counts at 0.6 / 0.7 / 0.8 (std with ddof=1);
- the ablation as a threshold x top-k table of final AP;
- ``study_map.png`` (val AP against epoch, mean line and min-max band over seeds),
  ``study_queries_per_object.png`` (the paper's analysis: queries per object above each threshold
  against epoch, one panel per threshold) and ``study_ablation.png`` (heat map of the grid).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = REPO / "docs" / "study" / "runs"
DEFAULT_PAGE = REPO / "docs" / "results.md"
DEFAULT_FIGURES = REPO / "docs" / "figures"

PARTS = {"arms": "study_arms", "ablation": "study_ablation"}  # folder under runs/ -> task_name
ARMS = ("dac", "baseline", "dac_cdn")
METRICS = (  # (CSV column, table header)
    ("val/mAP", "AP"),
    ("val/mAP_50", "AP50"),
    ("val/mAP_75", "AP75"),
    ("val/mAP_s", "APs"),
    ("val/mAP_m", "APm"),
    ("val/mAP_l", "APl"),
)
QPO_THRESHOLDS = (0.6, 0.7, 0.8)
QPO = tuple((f"val/queries_per_object@{t:.1f}", f"q/obj>{t:.1f}") for t in QPO_THRESHOLDS)
BEGIN, END = "<!-- study:generated:begin -->", "<!-- study:generated:end -->"


# ---------------------------------------------------------------------------------------- collect
def _job_record(job_dir: Path) -> dict | None:
    """What one finished multirun job was, or None if it has no complete metrics yet."""
    from omegaconf import OmegaConf

    config_file, overrides_file = job_dir / ".hydra" / "config.yaml", job_dir / ".hydra" / "overrides.yaml"
    metrics = sorted(job_dir.glob("csv/version_*/metrics.csv"))
    if not config_file.is_file() or not metrics:
        return None
    cfg = OmegaConf.load(config_file)
    epochs = {row["epoch"] for row in _val_rows(metrics[-1])}
    if len(epochs) < int(cfg.trainer.max_epochs):
        return None  # still running, or stopped early
    return {
        "arm": str(cfg.get("study_arm", "dac")),
        "seed": int(cfg.seed),
        "threshold": float(cfg.dac.o2m.threshold),
        "topk": int(cfg.dac.o2m.topk),
        "max_epochs": int(cfg.trainer.max_epochs),
        "overrides": list(OmegaConf.load(overrides_file)) if overrides_file.is_file() else [],
        "metrics_file": metrics[-1],
    }


def collect(log_dir: Path, runs_dir: Path) -> int:
    """Copy every finished job's metrics under ``log_dir`` into ``runs_dir``; returns the count.

    A job that ran again (a later sweep with the same settings) replaces the earlier copy: folders
    are visited oldest first.
    """
    count = 0
    for part, task_name in PARTS.items():
        for job_dir in sorted((log_dir / task_name / "multiruns").glob("*/*")):
            record = _job_record(job_dir) if job_dir.is_dir() else None
            if record is None:
                continue
            key = _run_key(part, record)
            out = runs_dir / part
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(record.pop("metrics_file"), out / f"{key}.csv")
            (out / f"{key}.json").write_text(json.dumps(record, indent=1) + "\n")
            count += 1
    _default_cell_from_arms(runs_dir)
    return count


def _default_cell_from_arms(runs_dir: Path) -> None:
    """The ablation's default cell is the arms' ``dac`` run at the ablation's seed (same config).

    run_study.sh does not run it twice; copy it into the grid unless the ablation ran it itself.
    """
    ablation = [json.loads(p.read_text()) for p in sorted((runs_dir / "ablation").glob("*.json"))]
    if not ablation:
        return
    seed = ablation[0]["seed"]
    source_csv, source_json = runs_dir / "arms" / f"dac_seed{seed}.csv", runs_dir / "arms" / f"dac_seed{seed}.json"
    if not source_json.is_file():
        return
    record = json.loads(source_json.read_text())
    key = _run_key("ablation", record)  # e.g. thr0.4_topk6 (dots: build names, never with_suffix)
    target_csv, target_json = runs_dir / "ablation" / f"{key}.csv", runs_dir / "ablation" / f"{key}.json"
    if target_json.is_file() and not json.loads(target_json.read_text()).get("from_arms"):
        return
    shutil.copyfile(source_csv, target_csv)
    target_json.write_text(json.dumps({**record, "from_arms": source_json.stem}, indent=1) + "\n")


def _run_key(part: str, record: dict) -> str:
    if part == "arms":
        return f"{record['arm']}_seed{record['seed']}"
    return f"thr{record['threshold']:g}_topk{record['topk']}"


# ---------------------------------------------------------------------------------------- read
def _val_rows(metrics_csv: Path) -> list[dict[str, str]]:
    """The validation rows of a Lightning CSVLogger file (one per epoch), oldest first."""
    with metrics_csv.open(newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("val/mAP")]


def load_runs(runs_dir: Path, part: str) -> list[dict]:
    """Every run of a part: its JSON record plus ``curve`` = {column: [value per epoch]}."""
    runs = []
    for record_file in sorted((runs_dir / part).glob("*.json")):
        record = json.loads(record_file.read_text())
        rows = _val_rows(record_file.parent / f"{record_file.stem}.csv")
        columns = [c for c, _ in METRICS + QPO]
        record["curve"] = {c: [float(r[c]) if r.get(c) else math.nan for r in rows] for c in columns}
        record["epochs"] = [int(r["epoch"]) + 1 for r in rows]
        runs.append(record)
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


# ---------------------------------------------------------------------------------------- tables
def arms_table(runs: list[dict]) -> str:
    """Markdown: one row per arm, mean ± std over seeds of the final-epoch metrics."""
    header = ["arm", "seeds"] + [h for _, h in METRICS + QPO]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in [a for a in ARMS if any(r["arm"] == a for r in runs)]:
        arm_runs = [r for r in runs if r["arm"] == arm]
        cells = [f"`{arm}`", ", ".join(str(r["seed"]) for r in sorted(arm_runs, key=lambda r: r["seed"]))]
        for column, _ in METRICS:
            values = [100 * r["curve"][column][-1] for r in arm_runs]
            if all(v < 0 or math.isnan(v) for v in values):  # COCO -1 or not logged: no object of that size
                cells.append("n/a")
                continue
            mean, std = mean_std(values)
            cells.append(f"{mean:.1f} ± {std:.1f}")
        for column, _ in QPO:
            mean, std = mean_std([r["curve"][column][-1] for r in arm_runs])
            cells.append(f"{mean:.2f} ± {std:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(runs: list[dict]) -> str:
    """Markdown: final AP of every arm at every seed (the paired comparison)."""
    seeds = sorted({r["seed"] for r in runs})
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    lines = ["| seed | " + " | ".join(f"`{a}` AP" for a in arms) + " |", "|" + "---|" * (len(arms) + 1)]
    for seed in seeds:
        cells = [str(seed)]
        for arm in arms:
            match = [r for r in runs if r["arm"] == arm and r["seed"] == seed]
            cells.append(f"{100 * match[0]['curve']['val/mAP'][-1]:.1f}" if match else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_grid(runs: list[dict]) -> tuple[list[float], list[int], list[list[float]]]:
    """(thresholds, top-ks, AP[threshold][top-k]) of the final epoch, NaN where a cell is missing."""
    thresholds = sorted({r["threshold"] for r in runs})
    topks = sorted({r["topk"] for r in runs})
    grid = [[math.nan] * len(topks) for _ in thresholds]
    for r in runs:
        grid[thresholds.index(r["threshold"])][topks.index(r["topk"])] = 100 * r["curve"]["val/mAP"][-1]
    return thresholds, topks, grid


def ablation_table(runs: list[dict]) -> str:
    thresholds, topks, grid = ablation_grid(runs)
    lines = ["| threshold \\ top-k | " + " | ".join(str(k) for k in topks) + " |", "|" + "---|" * (len(topks) + 1)]
    for t, row in zip(thresholds, grid):
        lines.append(f"| {t:g} | " + " | ".join("—" if math.isnan(v) else f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- plots
def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})


def plot_map(runs: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arm in [a for a in ARMS if any(r["arm"] == a for r in runs)]:
        stack = 100 * np.stack([np.asarray(r["curve"]["val/mAP"]) for r in runs if r["arm"] == arm])
        epochs = [r["epochs"] for r in runs if r["arm"] == arm][0]
        (line,) = ax.plot(epochs, stack.mean(0), marker="o", label=f"{arm} (mean of {len(stack)})")
        ax.fill_between(epochs, stack.min(0), stack.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val AP (%)")
    ax.set_title("Validation AP; band = min-max over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)


def plot_queries_per_object(runs: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(QPO), figsize=(4 * len(QPO), 3.4), sharey=True)
    for ax, (column, _), threshold in zip(axes, QPO, QPO_THRESHOLDS):
        for arm in [a for a in ARMS if any(r["arm"] == a for r in runs)]:
            stack = np.stack([np.asarray(r["curve"][column]) for r in runs if r["arm"] == arm])
            epochs = [r["epochs"] for r in runs if r["arm"] == arm][0]
            (line,) = ax.plot(epochs, stack.mean(0), marker="o", label=arm)
            ax.fill_between(epochs, stack.min(0), stack.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(f"score > {threshold}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("queries per object")
    axes[0].legend()
    fig.suptitle("Queries per object whose one-to-many score 0.3·p + 0.7·IoU exceeds a threshold")
    _save(fig, path)
    plt.close(fig)


def plot_ablation(runs: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    thresholds, topks, grid = ablation_grid(runs)
    values = np.asarray(grid)
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    image = ax.imshow(values, cmap="viridis", origin="lower")
    ax.set_xticks(range(len(topks)), [str(k) for k in topks])
    ax.set_yticks(range(len(thresholds)), [f"{t:g}" for t in thresholds])
    ax.set_xlabel("dac.o2m.topk")
    ax.set_ylabel("dac.o2m.threshold")
    for i in range(len(thresholds)):
        for j in range(len(topks)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color="white", fontsize=9)
    fig.colorbar(image, ax=ax, label="val AP (%)")
    ax.set_title("One-to-many ablation (final AP)")
    _save(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- page
def generated_block(arms: list[dict], ablation: list[dict], figures_rel: str) -> str:
    parts = [BEGIN, "<!-- Written by scripts/summarize_study.py from docs/study/runs; do not edit by hand. -->", ""]
    if arms:
        parts += [
            "### DAC against the baseline (final epoch, mean ± std over seeds)",
            "",
            "AP columns in %, COCO-style (AP = mean over IoU 0.5:0.95); q/obj>t = queries per object "
            "whose one-to-many score exceeds t, on the O-Decoder's final layer.",
            "",
            arms_table(arms),
            "",
            "Final AP of each run (same seed = same initialisation, data order and noise):",
            "",
            per_seed_table(arms),
            "",
            f"![val AP against epoch]({figures_rel}/study_map.png)",
            "",
            f"![queries per object against epoch]({figures_rel}/study_queries_per_object.png)",
            "",
        ]
    if ablation:
        parts += [
            "### One-to-many ablation: `dac.o2m.threshold` × `dac.o2m.topk` (final AP, %)",
            "",
            ablation_table(ablation),
            "",
            f"![ablation heat map]({figures_rel}/study_ablation.png)",
            "",
        ]
    return "\n".join(parts + [END])


def write_page(page: Path, block: str) -> None:
    """Replace the generated block of ``page`` (or create a page that holds only the block)."""
    if page.is_file():
        text = page.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            page.write_text(head + block + tail)
            return
        raise SystemExit(f"{page} has no {BEGIN} ... {END} block; add the two markers where the tables go.")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("# Results\n\n" + block + "\n")


def summarize(runs_dir: Path, page: Path, figures: Path) -> dict[str, list[dict]]:
    arms, ablation = load_runs(runs_dir, "arms"), load_runs(runs_dir, "ablation")
    if not arms and not ablation:
        raise SystemExit(f"No study runs under {runs_dir}: run `bash scripts/run_study.sh` (or pass --collect LOG_DIR).")
    if arms:
        plot_map(arms, figures / "study_map.png")
        plot_queries_per_object(arms, figures / "study_queries_per_object.png")
    if ablation:
        plot_ablation(ablation, figures / "study_ablation.png")
    rel = Path(os.path.relpath(figures, page.parent)).as_posix()
    write_page(page, generated_block(arms, ablation, rel))
    return {"arms": arms, "ablation": ablation}


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collect", type=Path, metavar="LOG_DIR", help="copy finished runs' metrics from this log folder first")
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="committed metric files (default: docs/study/runs)")
    parser.add_argument("--page", type=Path, default=DEFAULT_PAGE, help="results page to update (default: docs/results.md)")
    parser.add_argument("--figures", type=Path, default=DEFAULT_FIGURES, help="PNG folder (default: docs/figures)")
    args = parser.parse_args(argv)
    if args.collect is not None:
        print(f"collected {collect(args.collect, args.runs)} finished runs from {args.collect} into {args.runs}")
    result = summarize(args.runs, args.page, args.figures)
    print(f"wrote {args.page} ({len(result['arms'])} arm runs, {len(result['ablation'])} ablation runs) and PNGs in {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
