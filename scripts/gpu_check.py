"""One prepared validation-and-benchmark run of dac-detr on one CUDA GPU.

Parts, in order, each in its own process with its own time limit, so one hang cannot eat the
rest (the limits also fit a total budget: a part starts only with the time the later parts need
still left, and gets no more than what remains):

1. ``facts``            the machine: GPU, driver, CUDA, torch, triton, nvcc, packages;
   ``reference_build``  the official ``MultiScaleDeformableAttention`` CUDA op built from the
                        git-ignored ``.gpu_ref/ops`` (``scripts/msda_reference_op.py``), in the
                        background while the tests run (it needs the CPU, they the GPU);
2. ``pytest_gpu``       ``pytest -m gpu`` over the test files that hold GPU tests;
3. ``bench_msda``       ``scripts/bench_msda.py``: encoder and decoder shapes, bf16 and fp32,
                        Triton, grid_sample and the reference op, fwd / bwd / fwd+bwd;
4. ``train_step_*``     ``scripts/bench_train_step.py``: the R50 step at 800x1333, batch 2 (bf16-mixed;
                        fp32 and ``torch.compile`` when that script has ``--precision`` / ``--compile``);
5. ``train_quickstart`` the quickstart experiment on the GPU for a bounded number of steps: the
                        loss must fall and every logged value be finite.

Everything lands in one results folder: ``results.json`` (every part's status, time, command,
log tail and data, the machine facts and the targets met or missed), ``summary.md`` (the same
as tables) and ``logs.tar.gz`` (every part's full log and output files), rewritten after each
part, so a run stopped from outside keeps what it finished. Without CUDA (or with
``--cpu-smoke``) every part runs its CPU smoke mode instead, and the run exits 0 when the parts
that apply passed: CI runs it (tests/test_gpu_check.py) so the script does not rot.

    bash scripts/gpu_check.sh --out /tmp/gpu_check          # what a GPU session runs
    python scripts/gpu_check.py --cpu-smoke --out /tmp/gc    # the CPU smoke mode
    python scripts/gpu_check.py --only bench_msda,train_step_bf16 --out /tmp/gc   # a rerun of some parts
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))
import gpu_check_report  # noqa: E402  (the sibling module: targets and the Markdown summary)

DEFAULT_REFERENCE_SRC = ROOT / ".gpu_ref" / "ops"
LOG_TAIL_CHARS = 4000
# The GPU run's total: the 8 minutes less what gpu_check.sh spends installing first.
GPU_BUDGET_S, SMOKE_BUDGET_S = 450.0, 1200.0
REFERENCE_BUILD_LIMIT_S, REFERENCE_WAIT_S = 240.0, 60.0


@dataclass
class Part:
    name: str
    limit_s: float  # its own time limit on the GPU (the smoke mode uses --smoke-limit-s)
    reserve_s: float  # the least time worth starting it with
    run: Callable[["Context", float], dict]


@dataclass
class Context:
    args: argparse.Namespace
    gpu: bool
    work: Path
    env: dict
    deadline: float
    results: dict
    reference: "subprocess.Popen | None" = None
    reference_started: float = 0.0

    @property
    def python(self) -> str:
        return self.args.python


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="results folder (3 files)")
    parser.add_argument("--work", type=Path, help="folder for logs and part outputs (default: <out>.work)")
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU smoke modes (automatic without CUDA)")
    parser.add_argument("--budget-s", type=float, help=f"total seconds (default {GPU_BUDGET_S:.0f} on the GPU)")
    parser.add_argument("--smoke-limit-s", type=float, default=300.0, help="each part's limit in smoke mode")
    parser.add_argument("--only", default="", help="comma list of parts to run (default: all)")
    parser.add_argument("--reference-src", type=Path, default=DEFAULT_REFERENCE_SRC,
                        help="copy of the official models/ops (scripts/gpu_prepare.sh ops)")  # fmt: skip
    parser.add_argument("--train-steps", type=int, help="quickstart steps (default 300 on the GPU, 10 smoke)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the parts")
    args = parser.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.only) - {p.name for p in PARTS} - {"reference_build"})
    if unknown:
        parser.error(f"--only: unknown parts {unknown}; the parts are {[p.name for p in PARTS]}")
    return args


# --------------------------------------------------------------------------------------------
# Running one command under a time limit


def run_command(cmd: list[str], log: Path, timeout: float, env: dict, cwd: Path = ROOT) -> dict:
    """Run ``cmd`` with output to ``log``; kill its whole process group at ``timeout`` seconds."""
    start = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)  # fmt: skip
        try:
            returncode = process.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            stop(process)
            returncode = None
    return {"command": cmd, "returncode": returncode, "seconds": time.perf_counter() - start,
            "limit_s": timeout, "log": log.name, "log_tail": read_tail(log)}  # fmt: skip


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group, SIGKILL after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def read_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def command_status(record: dict, ok: bool = True, reason: str = "") -> dict:
    """passed / failed / timed_out from a finished command and the part's own check."""
    if record["returncode"] is None:
        record.update(status="timed_out", reason=f"stopped at its limit of {record['limit_s']:.0f} s")
    elif record["returncode"] != 0:
        record.update(status="failed", reason=reason or f"exit code {record['returncode']} (see the log tail)")
    elif not ok:
        record.update(status="failed", reason=reason)
    else:
        record.update(status="passed", reason=reason)
    return record


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# The parts


def part_facts(ctx: Context, limit: float) -> dict:
    """Machine facts (in this process: nothing here starts a CUDA kernel)."""
    import torch

    facts = {"python": platform.python_version(), "python_executable": ctx.python, "platform": platform.platform(),
             "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available(), "mode": "gpu" if ctx.gpu else "cpu-smoke"}  # fmt: skip
    facts["triton"] = package_version("triton")
    for name in ("lightning", "hydra-core", "omegaconf", "pycocotools", "numpy"):
        facts[name] = package_version(name)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                     gpu_memory_GiB=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)  # fmt: skip
    facts["nvidia_smi"] = tool_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                       "--format=csv,noheader"])  # fmt: skip
    facts["nvcc"] = tool_output(["nvcc", "--version"]).splitlines()[-1:] or ["not found"]
    facts["ninja"] = tool_output(["ninja", "--version"])
    facts["git_commit"] = tool_output(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    ctx.results["facts"] = facts
    return {"status": "passed", "reason": "", "seconds": 0.0, "data": facts}


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def tool_output(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (done.stdout or done.stderr).strip() or f"exit {done.returncode}"
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"not available: {error}"


def start_reference_build(ctx: Context) -> dict | None:
    """Start the reference-op build in the background (GPU only); the skip record otherwise."""
    if not ctx.gpu:
        return {"status": "skipped", "reason": "no CUDA device: the reference op is CUDA only"}
    if not (ctx.args.reference_src / "src").is_dir():
        return {"status": "unavailable", "reason": f"{ctx.args.reference_src} does not hold the official "
                "models/ops sources: run `scripts/gpu_prepare.sh ops <checkout>` and carry .gpu_ref"}  # fmt: skip
    cmd = [ctx.python, str(SCRIPTS / "msda_reference_op.py"), "--src", str(ctx.args.reference_src),
           "--build-dir", str(ctx.work / "reference_build")]  # fmt: skip
    log = open(ctx.work / "reference_build.log", "w")
    ctx.reference = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ctx.env, cwd=ROOT,
                                     start_new_session=True)  # fmt: skip
    ctx.reference_started = time.perf_counter()
    return None


def finish_reference_build(ctx: Context) -> dict:
    """Wait (bounded) for the background build; its record."""
    process, build_dir = ctx.reference, ctx.work / "reference_build"
    elapsed = time.perf_counter() - ctx.reference_started
    wait = max(1.0, min(REFERENCE_WAIT_S, REFERENCE_BUILD_LIMIT_S - elapsed, ctx.deadline - time.perf_counter()))
    try:
        process.wait(timeout=wait)
    except subprocess.TimeoutExpired:
        stop(process)
    ctx.reference = None
    record = {"seconds": time.perf_counter() - ctx.reference_started, "log": "reference_build.log",
              "log_tail": read_tail(ctx.work / "reference_build.log")}  # fmt: skip
    built = read_json(build_dir / "build.json")
    if built is None:
        record.update(status="timed_out", reason=f"no result after {record['seconds']:.0f} s: build stopped")
    else:
        record["data"] = {k: v for k, v in built.items() if k != "traceback"}
        status = {"built": "passed", "unavailable": "unavailable"}.get(built["status"], "failed")
        record.update(status=status, reason=built.get("reason", ""))
    return record


def gpu_test_files() -> list[str]:
    """The test files that hold GPU tests (collecting only those keeps collection short)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in p.read_text())


def part_pytest_gpu(ctx: Context, limit: float) -> dict:
    junit = ctx.work / "pytest_gpu.xml"
    cmd = [ctx.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           f"--junitxml={junit}", *gpu_test_files()]  # fmt: skip
    record = run_command(cmd, ctx.work / "pytest_gpu.log", limit, ctx.env)
    counts = junit_counts(junit)
    record["data"] = counts
    if counts is None:
        return command_status(record, False, "pytest wrote no JUnit report")
    if ctx.gpu and counts["skipped"]:
        return command_status(record, False, f"{counts['skipped']} GPU tests skipped on a CUDA machine")
    ran = counts["tests"] - counts["skipped"]
    note = f"{ran} passed of {counts['tests']}" if ctx.gpu else f"{counts['tests']} collected, all skipped without CUDA"
    return command_status(record, counts["failures"] + counts["errors"] == 0, note)


def junit_counts(path: Path) -> dict | None:
    import xml.etree.ElementTree as ElementTree

    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]  # fmt: skip
    return counts


def part_bench_msda(ctx: Context, limit: float) -> dict:
    out = ctx.work / "bench_msda.json"
    if ctx.gpu:
        build = ctx.results["parts"].get("reference_build") or {}
        cmd = [ctx.python, str(SCRIPTS / "bench_msda.py"), "--calls", "encoder,decoder", "--dtypes", "bf16,fp32",
               "--dists", "train,concentrated", "--rounds", "3", "--rep-ms", "100", "--out", str(out)]  # fmt: skip
        if build.get("status") == "passed":
            cmd += ["--reference-build", str(ctx.work / "reference_build")]
        else:
            cmd += ["--reference-unavailable", f"reference build {build.get('status', 'not run')}: "
                    f"{build.get('reason', '')}"[:500]]  # fmt: skip
    else:
        cmd = [ctx.python, str(SCRIPTS / "bench_msda.py"), "--cpu-smoke", "--out", str(out)]
    record = run_command(cmd, ctx.work / "bench_msda.log", limit, ctx.env)
    record["data"] = read_json(out)
    cases = len(record["data"]["cases"]) if record["data"] else 0
    reason = "correctness check failed (see the log tail)" if record["returncode"] == 1 else f"{cases} cases"
    return command_status(record, cases > 0, reason)


def train_step_flags() -> set[str]:
    """The options bench_train_step.py declares (read from its source: no import, no CUDA)."""
    tree = ast.parse((SCRIPTS / "bench_train_step.py").read_text())
    return {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
            and node.args and isinstance(node.args[0], ast.Constant)}  # fmt: skip


def train_step_part(variant: str, extra: list[str], needs: str | None) -> Callable[[Context, float], dict]:
    def run(ctx: Context, limit: float) -> dict:
        if needs is not None and needs not in train_step_flags():
            return {"status": "unavailable", "reason": f"scripts/bench_train_step.py has no {needs} option yet"}
        out = ctx.work / f"train_step_{variant}.json"
        mode = ["--rounds", "2", "--steps", "5", "--warmup", "2"] if ctx.gpu else ["--cpu-smoke"]
        cmd = [ctx.python, str(SCRIPTS / "bench_train_step.py"), *mode, *extra, "--out", str(out)]
        record = run_command(cmd, ctx.work / f"train_step_{variant}.log", limit, ctx.env)
        record["data"] = read_json(out)
        variants = (record["data"] or {}).get("variants", {})
        return command_status(record, bool(variants), f"variants {sorted(variants)}" if variants else "no JSON written")

    return run


def part_train_quickstart(ctx: Context, limit: float) -> dict:
    """The quickstart experiment for a bounded number of steps (CSV metrics, no checkpoints kept)."""
    steps = ctx.args.train_steps or (300 if ctx.gpu else 10)
    run_dir = ctx.work / "train_quickstart"
    cmd = [ctx.python, "-m", "dac_detr.train", "experiment=quickstart", f"trainer={'gpu' if ctx.gpu else 'cpu'}",
           f"trainer.max_steps={steps}", f"trainer.log_every_n_steps={10 if ctx.gpu else 1}",
           "trainer.num_sanity_val_steps=0", "logger=csv", f"hydra.run.dir={run_dir}", f"paths.log_dir={run_dir}",
           "task_name=gpu_check", "module.num_log_images=0", "~callbacks.progress_bar", "~callbacks.model_summary"]  # fmt: skip
    if not ctx.gpu:  # a small synthetic set and one validation batch: seconds on a CPU
        cmd += ["data.num_train=64", "data.num_val=8", "trainer.limit_val_batches=1"]
    record = run_command(cmd, ctx.work / "train_quickstart.log", limit, ctx.env)
    record["data"] = loss_curve(sorted(run_dir.glob("csv/version_*/metrics.csv")))
    data = record["data"]
    if data is None:
        return command_status(record, False, "no metrics.csv with train/loss_step written")
    ok = data["loss_falls"] and not data["non_finite"]
    reason = (f"loss {data['first_loss']:.3f} -> {data['last_loss']:.3f} over {data['steps_logged']} logged steps"
              + (f"; non-finite values in {data['non_finite']}" if data["non_finite"] else ""))  # fmt: skip
    return command_status(record, ok, reason + ("" if data["loss_falls"] else "; the loss did not fall"))


def loss_curve(paths: list[Path]) -> dict | None:
    """train/loss_step by step, first and last quarter means, and any non-finite training value."""
    if not paths:
        return None
    with open(paths[-1]) as f:
        rows = list(csv.DictReader(f))
    losses, non_finite = [], set()
    for row in rows:
        for key, text in row.items():
            # Training values only: a COCO metric of an area range with no objects in a small val
            # set is legitimately NaN.
            if text not in ("", None) and key.startswith(("train/", "lr-")) and not math.isfinite(float(text)):
                non_finite.add(key)
        if row.get("train/loss_step"):
            losses.append((int(row["step"]), float(row["train/loss_step"])))
    if not losses:
        return None
    quarter = max(1, len(losses) // 4)
    first = sum(v for _, v in losses[:quarter]) / quarter
    last = sum(v for _, v in losses[-quarter:]) / quarter
    return {"steps_logged": len(losses), "first_loss": losses[0][1], "last_loss": losses[-1][1],
            "first_quarter_mean": first, "last_quarter_mean": last, "loss_falls": last < first,
            "non_finite": sorted(non_finite), "curve": losses}  # fmt: skip


PARTS = [
    Part("facts", 30, 5, part_facts),
    Part("pytest_gpu", 150, 60, part_pytest_gpu),
    Part("bench_msda", 150, 60, part_bench_msda),
    Part("train_step_bf16", 110, 60, train_step_part("bf16", [], None)),
    Part("train_step_fp32", 90, 45, train_step_part("fp32", ["--precision", "fp32"], "--precision")),
    Part("train_quickstart", 100, 45, part_train_quickstart),
    Part("train_step_compile", 150, 60, train_step_part("compile", ["--compile", "--backends", "triton"], "--compile")),
]


# --------------------------------------------------------------------------------------------
# The run


def part_window(ctx: Context, index: int) -> float | None:
    """Seconds part ``index`` may take: its limit, less what the later parts need; None to skip."""
    part = PARTS[index]
    later = sum(p.reserve_s for p in PARTS[index + 1:] if wanted(ctx, p.name))
    left = ctx.deadline - time.perf_counter()
    window = min(part.limit_s if ctx.gpu else ctx.args.smoke_limit_s, left - later)
    return window if window >= part.reserve_s or (not ctx.gpu and left > 0) else None


def wanted(ctx: Context, name: str) -> bool:
    return not ctx.args.only or name in ctx.args.only


def make_context(args) -> Context:
    import torch

    gpu = torch.cuda.is_available() and not args.cpu_smoke
    work = (args.work or args.out.with_name(args.out.name + ".work")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline"}
    env.setdefault("DAC_DETR_DATA", str(work / "data"))
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke modes, even on a machine with a GPU
    budget = args.budget_s or (GPU_BUDGET_S if gpu else SMOKE_BUDGET_S)
    results = {"schema": 1, "mode": "gpu" if gpu else "cpu-smoke", "budget_s": budget,
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "finished": None, "facts": {}, "parts": {}, "targets": []}  # fmt: skip
    return Context(args, gpu, work, env, time.perf_counter() + budget, results)


def run_parts(ctx: Context) -> None:
    start = time.perf_counter()
    for index, part in enumerate(PARTS):
        if index == 1 and wanted(ctx, "reference_build") and (wanted(ctx, "bench_msda") or ctx.args.only):
            skipped = start_reference_build(ctx)
            if skipped is not None:
                ctx.results["parts"]["reference_build"] = skipped
        if part.name == "bench_msda" and ctx.reference is not None:
            ctx.results["parts"]["reference_build"] = finish_reference_build(ctx)
            write_results(ctx)
        if not wanted(ctx, part.name):
            continue
        window = part_window(ctx, index)
        if window is None:
            record = {"status": "not_run", "reason": "the total time budget was used up by the parts before it"}
        else:
            print(f"[gpu_check] {part.name}: up to {window:.0f} s", flush=True)
            try:
                record = part.run(ctx, window)
            except Exception as error:  # the driver's own bug in one part must not lose the others
                record = {"status": "failed", "reason": f"driver error: {type(error).__name__}: {error}"}
        ctx.results["parts"][part.name] = record
        print(f"[gpu_check] {part.name}: {record['status']} {record.get('reason', '')}", flush=True)
        ctx.results["elapsed_s"] = time.perf_counter() - start
        write_results(ctx)
    if ctx.reference is not None:  # --only without bench_msda
        ctx.results["parts"]["reference_build"] = finish_reference_build(ctx)


def write_results(ctx: Context, final: bool = False) -> None:
    ctx.results["targets"] = gpu_check_report.evaluate_targets(ctx.results)
    if final:
        ctx.results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = ctx.args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(ctx.results, indent=1, default=str))
    (out / "summary.md").write_text(gpu_check_report.markdown(ctx.results))
    with tarfile.open(out / "logs.tar.gz.part", "w:gz") as tar:
        # Not the synthetic data set (regenerated from its seed) nor the training checkpoints.
        tar.add(ctx.work, arcname="gpu_check", filter=lambda info: None if info.name.startswith(
            ("gpu_check/data", "gpu_check/train_quickstart/checkpoints")) else info)  # fmt: skip
    os.replace(out / "logs.tar.gz.part", out / "logs.tar.gz")


def main(argv=None) -> int:
    args = parse_args(argv)
    ctx = make_context(args)
    print(f"[gpu_check] mode {ctx.results['mode']}, budget {ctx.results['budget_s']:.0f} s, "
          f"results -> {args.out}, work -> {ctx.work}", flush=True)  # fmt: skip
    run_parts(ctx)
    write_results(ctx, final=True)
    print(gpu_check_report.markdown(ctx.results))
    # Skipped, unavailable (reference op, an option bench_train_step.py lacks) and not-run parts
    # are said in the summary; only a part that failed or hung fails the run.
    bad = [n for n, p in ctx.results["parts"].items() if p["status"] in ("failed", "timed_out")]
    if bad:
        print(f"[gpu_check] failed or timed out: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
