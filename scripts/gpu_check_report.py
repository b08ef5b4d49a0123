"""The targets of the GPU check, measured against them, and its Markdown summary.

``evaluate_targets(results)`` reads the parts' data in ``results.json`` (as scripts/gpu_check.py
writes it) and returns one row per target: the measured figure, the target, and met / missed,
or ``met: None`` with the reason nothing was measured (a part that did not run, the CPU smoke
mode, a missing reference op). ``markdown(results)`` renders the whole run as tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

MSDA_IMPLS = ("triton", "grid_sample", "reference")
MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    comparison: str  # ">=" or "<="
    threshold: float
    unit: str
    measure: Callable[[dict], tuple]  # results -> (value or None, where it came from or why not)


def part_data(results: dict, part: str):
    record = results.get("parts", {}).get(part)
    if record is None:
        return None, f"{part} did not run"
    if not record.get("data"):
        return None, f"{part} {record.get('status', '?')}: {record.get('reason', '')}".strip()
    return record["data"], ""


def msda_case(results: dict, call: str, dtype: str, locations: str = "train", batch: int = 2):
    data, why = part_data(results, "bench_msda")
    if data is None:
        return None, why
    for case in data.get("cases", []):
        if (case["call"], case["value_dtype"], case["locations"], case["B"]) == (call, dtype, locations, batch):
            return case, ""
    return None, f"bench_msda has no {call} {dtype} {locations} B={batch} case"


def encoder_forward_bandwidth(results: dict):
    case, why = msda_case(results, "encoder", "bf16")
    if case is None:
        return None, why
    if "triton" not in case["timings"]:
        return None, "no Triton timing (triton does not import, or the CPU smoke mode)"
    return case["timings"]["triton"]["fwd"]["hbm_roofline_pct"], "bench_msda encoder bf16 train B=2, Triton fwd"


def speedup_over_reference(call: str):
    def measure(results: dict):
        case, why = msda_case(results, call, "fp32")
        if case is None:
            return None, why
        timings = case["timings"]
        if "reference" not in timings:
            data = part_data(results, "bench_msda")[0] or {}
            return None, f"no reference op column: {data.get('reference_op_unavailable') or 'not built'}"
        if "triton" not in timings:
            return None, "no Triton timing"
        ratio = timings["reference"]["fwd+bwd"]["median_us"] / timings["triton"]["fwd+bwd"]["median_us"]
        return ratio, f"bench_msda {call} fp32 train B=2, reference fwd+bwd / Triton fwd+bwd (medians)"

    return measure


def step_variant(results: dict, part: str, name: str):
    data, why = part_data(results, part)
    if data is None:
        return None, why
    if data.get("smoke"):
        return None, f"{part} ran its CPU smoke mode"
    variant = data.get("variants", {}).get(name)
    return (variant, "") if variant else (None, f"{part} has no {name} variant")


def dac_overhead(key: str):
    def measure(results: dict):
        on, why_on = step_variant(results, "train_step_bf16", "triton/dac_on")
        off, why_off = step_variant(results, "train_step_bf16", "triton/dac_off")
        if on is None or off is None:
            return None, why_on or why_off
        if on.get(key) is None or off.get(key) is None:
            return None, f"no {key} recorded"
        return 100 * (on[key] / off[key] - 1), f"bench_train_step bf16-mixed, triton/dac_on vs triton/dac_off ({key})"

    return measure


def bf16_memory_ratio(results: dict):
    bf16, why_bf16 = step_variant(results, "train_step_bf16", "triton/dac_on")
    fp32, why_fp32 = step_variant(results, "train_step_fp32", "triton/dac_on")
    if bf16 is None or fp32 is None:
        return None, why_bf16 or why_fp32
    if not bf16.get("peak_memory_MB") or not fp32.get("peak_memory_MB"):
        return None, "no peak memory recorded"
    return bf16["peak_memory_MB"] / fp32["peak_memory_MB"], "bench_train_step triton/dac_on, bf16-mixed / fp32 peak"


TARGETS = (
    Target("msda_encoder_fwd_bf16_bandwidth", "encoder MSDA forward, bf16, B=2: share of the measured copy bandwidth",
           ">=", 25.0, "%", encoder_forward_bandwidth),
    Target("msda_encoder_fwd_bwd_vs_reference_fp32", "encoder MSDA forward+backward, fp32: faster than the reference CUDA op",
           ">=", 1.5, "x", speedup_over_reference("encoder")),
    Target("msda_decoder_fwd_bwd_vs_reference_fp32", "decoder MSDA forward+backward, fp32: faster than the reference CUDA op",
           ">=", 1.5, "x", speedup_over_reference("decoder")),
    Target("dac_step_time_overhead", "DAC on vs off: training-step time overhead",
           "<=", 20.0, "%", dac_overhead("step_ms_median")),
    Target("dac_step_memory_overhead", "DAC on vs off: training-step peak-memory overhead",
           "<=", 15.0, "%", dac_overhead("peak_memory_MB")),
    Target("bf16_step_memory_vs_fp32", "bf16-mixed training step: peak memory as a fraction of fp32's",
           "<=", 0.7, "x", bf16_memory_ratio),
)  # fmt: skip


def evaluate_targets(results: dict) -> list[dict]:
    rows = []
    for target in TARGETS:
        try:
            value, source = target.measure(results)
        except (KeyError, TypeError, ZeroDivisionError) as error:  # a part's JSON not as expected
            value, source = None, f"could not read the figure: {type(error).__name__}: {error}"
        met = None if value is None else (value >= target.threshold if target.comparison == ">=" else value <= target.threshold)
        rows.append({"name": target.name, "description": target.description, "measured": value,
                     "target": f"{target.comparison} {target.threshold:g} {target.unit}", "unit": target.unit,
                     "met": met, "source": source})  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------
# Markdown


def fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in row) + " |" for row in rows]


def facts_section(results: dict) -> list[str]:
    facts = results.get("facts", {})
    keys = ("gpu", "compute_capability", "gpu_memory_GiB", "nvidia_smi", "torch", "torch_cuda", "triton", "nvcc",
            "python", "cpu_count", "lightning", "hydra-core", "pycocotools", "git_commit")  # fmt: skip
    return ["## Machine", "", *table(["fact", "value"], [[k, facts[k]] for k in keys if k in facts]), ""]


def parts_section(results: dict) -> list[str]:
    rows = [[name, p["status"], fmt(p.get("seconds"), 0), fmt(p.get("limit_s"), 0), p.get("reason", "")[:300]]
            for name, p in results.get("parts", {}).items()]  # fmt: skip
    return ["## Parts", "", *table(["part", "status", "s", "limit s", "note"], rows), ""]


def targets_section(results: dict) -> list[str]:
    rows = []
    for t in results.get("targets", []):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        rows.append([t["description"], f"{fmt(t['measured'], 2)} {t['unit']}" if t["measured"] is not None else "-",
                     t["target"], verdict, t["source"]])  # fmt: skip
    return ["## Targets", "", *table(["target", "measured", "wanted", "result", "from"], rows), ""]


def msda_section(results: dict) -> list[str]:
    data, why = part_data(results, "bench_msda")
    if data is None:
        return ["## Deformable attention (bench_msda.py)", "", f"No figures: {why}.", ""]
    env = data["environment"]
    lines = ["## Deformable attention (bench_msda.py)", "",
             f"Copy bandwidth measured {data['copy_bandwidth_GBps']:.0f} GB/s on {env.get('gpu', env['device'])}; "
             f"reference op: {data.get('reference_op') or 'none'}"
             + (f" ({data['reference_op_unavailable']})" if data.get("reference_op_unavailable") else "") + ". "
             "Medians in microseconds; '% bw' is compulsory bytes / time / copy bandwidth; 'x gs' is the "
             "grid_sample time over this one.", ""]  # fmt: skip
    rows = []
    for case in data["cases"]:
        base = case["timings"].get("grid_sample", {})
        for impl, modes in case["timings"].items():
            ok = [v["ok"] for v in case["correctness"][impl].values()]
            rows.append([case["call"], case["value_dtype"], case["locations"], case["B"], case["S"], case["Q"], impl,
                         *(fmt(modes[m]["median_us"]) for m in MODES), fmt(modes["fwd"]["hbm_roofline_pct"]),
                         fmt(base["fwd+bwd"]["median_us"] / modes["fwd+bwd"]["median_us"], 2) if base else "-",
                         "-" if None in ok else ("yes" if all(ok) else "NO")])  # fmt: skip
    header = ["call", "dtype", "locations", "B", "S", "Q", "impl", "fwd us", "bwd us", "fwd+bwd us", "fwd % bw",
              "x gs (fwd+bwd)", "correct"]  # fmt: skip
    return lines + table(header, rows) + [""]


def step_section(results: dict) -> list[str]:
    lines = ["## Training step (bench_train_step.py)", ""]
    for part in ("train_step_bf16", "train_step_fp32", "train_step_compile"):
        data, why = part_data(results, part)
        if data is None:
            lines += [f"{part}: no figures ({why}).", ""]
            continue
        setup = data.get("setup", {})
        lines += [f"{part}: {setup.get('backbone')} {setup.get('image_hw')} x{setup.get('batch')}, "
                  f"{setup.get('precision')}{', CPU smoke' if data.get('smoke') else ''}", ""]  # fmt: skip
        rows = [[name, fmt(v.get("step_ms_median")), f"{fmt(v.get('step_ms_p20'))}-{fmt(v.get('step_ms_p80'))}",
                 fmt(v.get("peak_memory_MB"), 0), fmt(v.get("compile_s"))]
                for name, v in data.get("variants", {}).items()]  # fmt: skip
        lines += table(["variant", "median ms", "p20-p80 ms", "peak MB", "compile s"], rows) + [""]
    return lines


def training_section(results: dict) -> list[str]:
    data, why = part_data(results, "train_quickstart")
    if data is None:
        return ["## Short training (quickstart)", "", f"No figures: {why}.", ""]
    return ["## Short training (quickstart)", "",
            f"{data['steps_logged']} logged steps: train/loss {data['first_loss']:.3f} -> {data['last_loss']:.3f} "
            f"(first-quarter mean {data['first_quarter_mean']:.3f}, last-quarter mean {data['last_quarter_mean']:.3f}); "
            f"loss falls: {'yes' if data['loss_falls'] else 'NO'}; non-finite logged values: "
            f"{', '.join(data['non_finite']) or 'none'}.", ""]  # fmt: skip


def markdown(results: dict) -> str:
    lines = [f"# dac-detr GPU check ({results.get('mode')})", "",
             f"Started {results.get('started')}, finished {results.get('finished') or '(running)'}, "
             f"{fmt(results.get('elapsed_s'), 0)} s of a {fmt(results.get('budget_s'), 0)} s budget.", ""]  # fmt: skip
    if results.get("mode") != "gpu":
        lines += ["CPU smoke mode: the figures below say nothing about GPU speed.", ""]
    for section in (facts_section, parts_section, targets_section, msda_section, step_section, training_section):
        lines += section(results)
    return "\n".join(lines)
