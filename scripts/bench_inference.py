"""Inference speed, side by side in one run: PyTorch eager, torch.compile and onnxruntime.

    python scripts/bench_inference.py --threads 4                  # CPU: quickstart + R50 800x1333
    python scripts/bench_inference.py --device cuda                # + CUDA rows (fp32 and bf16)
    python scripts/bench_inference.py --iters 2 --warmup 1 --models quickstart   # a quick check

Models (random weights: speed does not depend on them): ``quickstart`` (the tiny DAC-DETR of the
quickstart at its 64 x 64 evaluation size) and ``r50`` (the official R50 DAC-DETR, 6 + 6 layers,
900 queries, at 800 x 1333). Batch 1, O-Decoder inference path, no post-processing. Each backend
runs ``--warmup`` calls, then ``--iters`` timed ones; reported: images/s (1 / mean latency),
median and p90 latency. The ONNX file is exported once per model (slow: minutes for R50) into
``--workdir`` and reused when it exists. Prints a markdown table (and writes --json if given).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

MODELS = {
    # name: (config overrides, (H, W))
    "quickstart": ([], (64, 64)),
    "r50": (["backbone=r50", "model=dac_detr", "backbone.pretrained=null"], (800, 1333)),
}


def build(overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from dac_detr.utils.instantiate import build_detector

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="dac_detr.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.model.dac_enabled = False
        cfg.model.dn_number = 0
    torch.manual_seed(0)
    return build_detector(cfg, 6).eval()


def timed(fn, warmup: int, iters: int, sync=lambda: None) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"images_per_s": len(times) / sum(times), "median_ms": 1e3 * statistics.median(times), "p90_ms": 1e3 * p90}


def bench_model(name: str, args) -> list[dict]:
    from dac_detr.deploy.graph import InferenceGraph

    overrides, (h, w) = MODELS[name]
    model = build(overrides)
    images = torch.randn(1, 3, h, w)
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    rows = []

    def row(backend, device, dtype, times):
        rows.append({"model": name, "size": f"{h}x{w}", "backend": backend, "device": device, "dtype": dtype, **summary(times)})
        print(f"  {name} {backend} {device} {dtype}: {rows[-1]['median_ms']:.1f} ms median", file=sys.stderr, flush=True)

    graph = InferenceGraph(model).eval()
    with torch.no_grad():
        row("eager", "cpu", "fp32", timed(lambda: graph(images, mask), args.warmup, args.iters))
        if not args.no_compile:
            compiled = torch.compile(graph, dynamic=False)
            row("torch.compile", "cpu", "fp32", timed(lambda: compiled(images, mask), args.warmup + 1, args.iters))

    from dac_detr.deploy.onnx_export import export_onnx, graph_metadata
    from dac_detr.deploy.onnx_runtime import OnnxDetector

    path = Path(args.workdir) / f"bench_{name}.onnx"
    if not path.exists():
        start = time.perf_counter()
        export_onnx(graph, path, metadata=graph_metadata([f"c{i}" for i in range(6)], list(range(6)), {}, None))
        print(f"  exported {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    session = OnnxDetector(path, device="cpu", threads=args.threads)
    row("onnxruntime", "cpu", "fp32", timed(lambda: session(images, mask), args.warmup, args.iters))

    if args.device == "cuda" and torch.cuda.is_available():
        sync = torch.cuda.synchronize
        cuda_graph = graph.cuda()
        x, m = images.cuda(), mask.cuda()
        with torch.no_grad():
            row("eager", "cuda", "fp32", timed(lambda: cuda_graph(x, m), args.warmup, args.iters, sync))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                row("eager", "cuda", "bf16", timed(lambda: cuda_graph(x, m), args.warmup, args.iters, sync))
            if not args.no_compile:
                compiled = torch.compile(cuda_graph, dynamic=False)
                row("torch.compile", "cuda", "fp32", timed(lambda: compiled(x, m), args.warmup + 1, args.iters, sync))
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    row("torch.compile", "cuda", "bf16", timed(lambda: compiled(x, m), args.warmup + 1, args.iters, sync))
        cuda_session = OnnxDetector(path, device="auto", threads=args.threads)
        if "CUDAExecutionProvider" in cuda_session.providers:
            row("onnxruntime", "cuda", "fp32", timed(lambda: cuda_session(images, mask), args.warmup, args.iters))
        graph.cpu()
    return rows


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform.processor() is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(rows: list[dict], threads: int) -> str:
    import onnxruntime

    lines = [f"Batch 1, {threads} CPU thread(s) of {os.cpu_count()}, {cpu_name()}, torch {torch.__version__}, "
             f"onnxruntime {onnxruntime.__version__}", "",
             "| model | size | backend | device | dtype | images/s | median ms | p90 ms | vs eager |",
             "|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["device"] == r["device"] and b["backend"] == "eager"
                    and b["dtype"] == "fp32")
        lines.append(f"| {r['model']} | {r['size']} | {r['backend']} | {r['device']} | {r['dtype']} | {r['images_per_s']:.2f} | "
                     f"{r['median_ms']:.1f} | {r['p90_ms']:.1f} | {base['median_ms'] / r['median_ms']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: add CUDA rows (fp32, bf16)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dac_detr_bench"),
                        help="where the ONNX files are kept (reused when present)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DAC_DETR_MSDA", "auto")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        rows += bench_model(name, args)
    table = markdown(rows, args.threads)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
