"""Benchmark of multi-scale deformable attention: the Triton kernels against the grid_sample path.

Protocol (docs/kernels.md and docs/benchmarks.md describe the kernels and the figures):

* correctness first, in the same run: output and all three gradients of every implementation
  against the fp32 grid_sample path fed the same (upcast) inputs, with the tolerance stated;
* shapes of DAC-DETR training: the encoder call (B = 2, S = Q = 22,223 at 800x1333) and
  the decoder call (B = 2, Q = 1,100); bf16 and fp32 values, fp32 locations and weights;
* three location sets: ``train`` (encoder: every token's own pixel plus rings of 1-4 px;
  decoder: queries clustered on a few boxes), ``uniform`` (the worst case for locality) and
  ``concentrated`` (all queries on 3 small objects: the worst case for atomic contention); each
  has ~1 % of samples outside the maps and weights from a softmax over L*P;
* forward (no_grad), backward alone (on a prepared grad_out) and forward+backward, timed with
  ``triton.testing.do_bench`` (L2 flushed before each call; decoder also under a CUDA graph),
  implementations interleaved A B A B ... over several rounds in one process; median and the
  20-80 % spread;
* the reference CUDA op (Deformable-DETR / DAC-DETR ``MultiScaleDeformableAttention``) as an
  extra column, fed fp32 inputs: built on the GPU machine by ``scripts/msda_reference_op.py`` from a
  git-ignored copy of the official sources (``--reference-build DIR``), or an installed
  ``mmcv.ops`` / extension; never vendored here. When it is missing the JSON says why;
* memory kept for backward (bytes of saved tensors beyond the inputs, any device) and, on CUDA,
  the peak allocation of forward and backward;
* % of the HBM roofline = compulsory bytes (the least traffic one call must move: values, locations,
  weights and output once) / time / copy bandwidth measured here.

Everything goes to a JSON file (default ``scripts/results/bench_msda.json``, rewritten after every
case, so a run stopped at a time limit keeps the cases it finished) and a table on stdout.

Without CUDA (or with ``--cpu-smoke``) it runs a reduced mode so CI can check it does not rot:
small shapes, the grid_sample path timed with a wall clock, and the Triton kernels in the Triton
interpreter at a tiny shape (``TRITON_INTERPRET=1`` is set before the kernels are imported).
Those CPU timings say nothing about GPU performance.

    python scripts/bench_msda.py                       # full GPU run
    python scripts/bench_msda.py --calls decoder --dtypes bf16 --dists train
    python scripts/bench_msda.py --reference-build /tmp/msda_ref     # with the reference op column
    python scripts/bench_msda.py --cpu-smoke --out /tmp/msda.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("bf16", "fp32", "fp16")
DISTS = ("train", "uniform", "concentrated")
CALLS = ("encoder", "decoder")
MODES = ("fwd", "bwd", "fwd+bwd")

ENCODER_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]  # 800x1333 padded: S = 22,223
DECODER_QUERIES = 1100  # 900 matching + up to 200 CDN queries
SMOKE_LEVELS = [(8, 12), (4, 6), (2, 3), (1, 2)]  # S = 128
SMOKE_DECODER_QUERIES = 30
TINY_LEVELS = [(3, 4), (2, 2)]  # the interpreter's shape: S = 16
NUM_HEADS, HEAD_DIM, NUM_POINTS = 8, 32, 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="reduced CPU mode (automatic without CUDA)")
    parser.add_argument("--calls", default=",".join(CALLS), help=f"comma list of {CALLS}")
    parser.add_argument("--dtypes", default="bf16,fp32", help=f"comma list of {DTYPES} (value dtype)")
    parser.add_argument("--dists", default=",".join(DISTS), help=f"comma list of {DISTS}")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=200.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_msda.json")
    parser.add_argument("--reference-build", type=Path, help="build folder of scripts/msda_reference_op.py")
    parser.add_argument("--reference-unavailable", default="", help="why there is no reference op (recorded)")
    args = parser.parse_args(argv)
    for name, allowed in (("calls", CALLS), ("dtypes", DTYPES), ("dists", DISTS)):
        values = [v.strip() for v in getattr(args, name).split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"--{name}: {bad or 'nothing'} not in {allowed}")
        setattr(args, name, values)
    if args.batch < 1 or args.rounds < 1:
        parser.error("--batch and --rounds must be >= 1")
    return args


args = parse_args() if __name__ == "__main__" else None

# The interpreter must be chosen before the kernels are decorated (import time).
import torch  # noqa: E402

SMOKE = args is not None and (args.cpu_smoke or not torch.cuda.is_available())
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dac_detr.kernels import ms_deform_attn_torch  # noqa: E402
from dac_detr.kernels import ops as msda_ops  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from msda_reference_op import find_reference_op  # noqa: E402

msda_triton = msda_ops.msda_triton  # None when triton does not import

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Case:
    call: str
    dtype: str
    dist: str
    batch: int
    levels: list
    num_queries: int
    value: torch.Tensor = field(repr=False)
    spatial_shapes: torch.Tensor = field(repr=False)
    level_start_index: torch.Tensor = field(repr=False)
    loc: torch.Tensor = field(repr=False)
    weights: torch.Tensor = field(repr=False)
    grad_out: torch.Tensor = field(repr=False)

    @property
    def num_keys(self) -> int:
        return sum(h * w for h, w in self.levels)

    def describe(self) -> dict:
        return {
            "call": self.call, "value_dtype": self.dtype, "locations": self.dist, "B": self.batch,
            "S": self.num_keys, "Q": self.num_queries, "H": self.value.shape[2], "D": self.value.shape[3],
            "L": len(self.levels), "P": NUM_POINTS, "levels": self.levels,
            "loc_dtype": "fp32", "weight_dtype": "fp32",
        }  # fmt: skip


def level_tables(levels, device):
    spatial_shapes = torch.tensor(levels, dtype=torch.int64, device=device)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def encoder_reference_points(levels, device):
    """(S, 2): the centre of every token's own pixel, normalised (what the encoder uses)."""
    points = []
    for h, w in levels:
        ys, xs = torch.meshgrid(
            (torch.arange(h, device=device) + 0.5) / h, (torch.arange(w, device=device) + 0.5) / w, indexing="ij"
        )
        points.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    return torch.cat(points)


def make_locations(call, dist, batch, num_queries, heads, levels, generator, device):
    """(B, Q, H, L, P, 2) fp32 locations of one distribution (see the module docstring)."""
    L, H, P = len(levels), heads, NUM_POINTS
    shape = (batch, num_queries, H, L, P, 2)
    sizes = torch.tensor([[w, h] for h, w in levels], device=device, dtype=torch.float32).view(1, 1, 1, L, 1, 2)
    if dist == "uniform":
        loc = torch.rand(shape, device=device, generator=generator) * 1.02 - 0.01
    else:
        if dist == "train" and call == "encoder":
            ref = encoder_reference_points(levels, device)[:num_queries].view(1, num_queries, 1, 1, 1, 2)
            ref = ref.expand(batch, -1, -1, -1, -1, -1)
        else:
            # Queries clustered on boxes: 20 boxes for training-like decoder inputs, 3 small
            # objects for the contention worst case (also used for the encoder).
            num_boxes, box_size = (20, 0.15) if dist == "train" else (3, 0.02)
            centres = torch.rand(batch, num_boxes, 2, device=device, generator=generator) * 0.8 + 0.1
            which = torch.randint(0, num_boxes, (batch, num_queries), device=device, generator=generator)
            jitter = (torch.rand(batch, num_queries, 2, device=device, generator=generator) - 0.5) * box_size
            ref = (torch.gather(centres, 1, which[..., None].expand(-1, -1, 2)) + jitter).view(
                batch, num_queries, 1, 1, 1, 2
            )
        # The sampling_offsets bias init: head h looks along angle 2*pi*h/H, point p at (p+1) px.
        angles = torch.arange(H, device=device, dtype=torch.float32) * (2 * math.pi / H)
        direction = torch.stack([angles.cos(), angles.sin()], -1).view(1, 1, H, 1, 1, 2)
        radius = torch.arange(1, P + 1, device=device, dtype=torch.float32).view(1, 1, 1, 1, P, 1)
        spread = 1.0 if dist == "concentrated" else 0.5
        noise = torch.randn(shape, device=device, generator=generator) * spread
        loc = ref + (direction * radius * (1.0 if dist == "train" else 0.5) + noise) / sizes
    outside = torch.rand(shape[:-1] + (1,), device=device, generator=generator) < 0.01
    return torch.where(outside, loc + 1.2, loc).contiguous()


def make_case(call, dtype, dist, batch, levels, decoder_queries, device, heads=NUM_HEADS, head_dim=HEAD_DIM, seed=0):
    generator = torch.Generator(device=device).manual_seed(seed)
    spatial_shapes, level_start_index = level_tables(levels, device)
    num_keys = sum(h * w for h, w in levels)
    num_queries = num_keys if call == "encoder" else decoder_queries
    L = len(levels)
    value = torch.randn(batch, num_keys, heads, head_dim, device=device, generator=generator)
    loc = make_locations(call, dist, batch, num_queries, heads, levels, generator, device)
    logits = torch.randn(batch, num_queries, heads, L * NUM_POINTS, device=device, generator=generator)
    weights = logits.softmax(-1).view(batch, num_queries, heads, L, NUM_POINTS)
    grad_out = torch.randn(batch, num_queries, heads * head_dim, device=device, generator=generator)
    torch_dtype = TORCH_DTYPES[dtype]
    return Case(call, dtype, dist, batch, levels, num_queries, value.to(torch_dtype), spatial_shapes,
                level_start_index, loc, weights, grad_out.to(torch_dtype))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Implementations: each gives fwd(), bwd() and fwd_bwd() closures over one case.


def grid_sample_impl(case):
    v, ss, lsi, loc, w, go = case.value, case.spatial_shapes, case.level_start_index, case.loc, case.weights, case.grad_out
    leaves = [t.detach().clone().requires_grad_(True) for t in (v, loc, w)]

    def fwd():
        with torch.no_grad():
            return ms_deform_attn_torch(v, ss, lsi, loc, w)

    out = ms_deform_attn_torch(leaves[0], ss, lsi, leaves[1], leaves[2])

    def bwd():
        return torch.autograd.grad(out, leaves, go, retain_graph=True)

    def fwd_bwd():
        o = ms_deform_attn_torch(leaves[0], ss, lsi, leaves[1], leaves[2])
        return torch.autograd.grad(o, leaves, go)

    def outputs():
        o = ms_deform_attn_torch(leaves[0], ss, lsi, leaves[1], leaves[2])
        return (o.detach(), *torch.autograd.grad(o, leaves, go))

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}, outputs


def triton_impl(case):
    """The kernels as the custom op runs them (its backward op is exactly ``bwd``)."""
    v, loc, w, go = case.value, case.loc, case.weights, case.grad_out
    meta = msda_triton.level_metadata(case.spatial_shapes, case.level_start_index, v.device)

    def fwd():
        return msda_triton.ms_deform_attn_triton_forward(v, meta, loc, w)

    def bwd():
        return msda_triton.ms_deform_attn_triton_backward(go, v, meta, loc, w)

    def fwd_bwd():
        fwd()
        return bwd()

    def outputs():
        return (fwd(), *bwd())

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}, outputs


def reference_impl(apply):
    """The reference op runs fp32 only; half inputs are cast, as DINO/detrex do under AMP."""

    def build(case):
        ss, lsi = case.spatial_shapes, case.level_start_index
        v, loc, w, go = case.value.float(), case.loc.float(), case.weights.float(), case.grad_out.float()
        leaves = [t.detach().clone().requires_grad_(True) for t in (v, loc, w)]

        def fwd():
            with torch.no_grad():
                return apply(v, ss, lsi, loc, w)

        out = apply(leaves[0], ss, lsi, leaves[1], leaves[2])

        def bwd():
            return torch.autograd.grad(out, leaves, go, retain_graph=True)

        def fwd_bwd():
            o = apply(leaves[0], ss, lsi, leaves[1], leaves[2])
            return torch.autograd.grad(o, leaves, go)

        def outputs():
            o = apply(leaves[0], ss, lsi, leaves[1], leaves[2])
            return (o.detach(), *torch.autograd.grad(o, leaves, go))

        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}, outputs

    return build


# --------------------------------------------------------------------------------------------
# Measurements


def quantiles_ms(fn, warmup_ms, rep_ms, cuda_graph=False):
    """(p20, p50, p80) in ms."""
    if torch.cuda.is_available() and not SMOKE:
        import triton.testing

        if cuda_graph:
            return tuple(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.2, 0.5, 0.8]))
        return tuple(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8]))
    # CPU (smoke mode): wall clock, at least 2 calls, more while within rep_ms.
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 2 or (time.perf_counter() < deadline and len(times) < 100):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return q[1], statistics.median(times), q[7]


def saved_bytes_beyond_inputs(forward, inputs):
    """Bytes autograd keeps for backward, not counting storages of the inputs themselves."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return total, out


@contextlib.contextmanager
def forced_backend(name):
    previous = os.environ.get(msda_ops.BACKEND_ENV)
    os.environ[msda_ops.BACKEND_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(msda_ops.BACKEND_ENV, None)
        else:
            os.environ[msda_ops.BACKEND_ENV] = previous


def memory_report(case, impl_name, reference_apply):
    """Saved-for-backward bytes beyond the inputs, and CUDA peaks of forward and backward."""
    ss, lsi = case.spatial_shapes, case.level_start_index
    cast = impl_name == "reference"
    leaves = [(t.float() if cast else t).detach().clone().requires_grad_(True) for t in (case.value, case.loc, case.weights)]
    go = case.grad_out.float() if cast else case.grad_out

    def forward():
        if impl_name == "grid_sample":
            return ms_deform_attn_torch(leaves[0], ss, lsi, leaves[1], leaves[2])
        if impl_name == "reference":
            return reference_apply(leaves[0], ss, lsi, leaves[1], leaves[2])
        with forced_backend("triton"):
            return msda_ops.ms_deform_attn_op(leaves[0], ss, lsi, leaves[1], leaves[2])

    report = {}
    cuda = leaves[0].is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    kept, out = saved_bytes_beyond_inputs(forward, [*leaves, ss, lsi])
    report["saved_for_backward_MB"] = kept / 1e6
    if cuda:
        torch.cuda.synchronize()
        report["fwd_peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 1e6
        report["kept_after_fwd_MB"] = (torch.cuda.memory_allocated() - base) / 1e6
        torch.cuda.reset_peak_memory_stats()
        base_bwd = torch.cuda.memory_allocated()
    with forced_backend("triton") if impl_name == "triton" else contextlib.nullcontext():
        torch.autograd.grad(out, leaves, go)
    if cuda:
        torch.cuda.synchronize()
        report["bwd_peak_MB"] = (torch.cuda.max_memory_allocated() - base_bwd) / 1e6
    return report


def compulsory_bytes(case):
    """HBM minimum per call: every input read and every output written once; backward includes
    the fp32 zero-fill of grad_value and its cast to the value dtype."""
    bv = case.value.element_size()
    _, _, heads, head_dim = case.value.shape
    n = case.batch * case.num_queries * heads * len(case.levels) * NUM_POINTS
    value = case.batch * case.num_keys * heads * head_dim
    out = case.batch * case.num_queries * heads * head_dim
    loc, weights = 8 * n, 4 * n
    fwd = value * bv + loc + weights + out * bv
    bwd = out * bv + value * bv + loc + weights + 4 * value + loc + weights
    bwd += 4 * value  # zero-fill of the fp32 grad_value buffer
    if bv != 4:
        bwd += 4 * value + value * bv  # its cast to the value dtype
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def copy_bandwidth_GBps(device):
    numel = (256 << 20) if device.type == "cuda" else (16 << 20)
    src = torch.empty(numel, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    _, median_ms, _ = quantiles_ms(lambda: dst.copy_(src), 25, 200)
    return 2 * src.numel() * 4 / (median_ms / 1000) / 1e9


def correctness(case, outputs_fn, checked=True):
    """Max abs / relative error of (out, grad_value, grad_loc, grad_attn) against the fp32
    grid_sample path fed the same inputs upcast to fp32. ``checked=False`` (the grid_sample
    baseline itself, which rounds locations to the value dtype) records the errors only."""
    leaves = [t.detach().float().clone().requires_grad_(True) for t in (case.value, case.loc, case.weights)]
    ref_out = ms_deform_attn_torch(leaves[0], case.spatial_shapes, case.level_start_index, leaves[1], leaves[2])
    want = (ref_out.detach(), *torch.autograd.grad(ref_out, leaves, case.grad_out.float()))
    got = outputs_fn()
    half = case.dtype != "fp32"
    # Half values: one rounding of out/grad_value to the half mantissa; fp32 grads computed in
    # fp32 from the same numbers. fp32 values: summation order only.
    tolerances = {"out": 2**-7 if half else 1e-5, "grad_value": 2**-7 if half else 1e-5,
                  "grad_loc": 1e-4 if half else 1e-5, "grad_attn": 1e-4 if half else 1e-5}  # fmt: skip
    result = {}
    for name, g, w in zip(tolerances, got, want):
        g, w = g.float(), w.float()
        rel = ((g - w).norm() / w.norm().clamp_min(1e-30)).item()
        result[name] = {"max_abs": (g - w).abs().max().item() if g.numel() else 0.0, "rel_norm": rel,
                        "tolerance_rel_norm": tolerances[name], "ok": rel <= tolerances[name] if checked else None}  # fmt: skip
    return result


def summarise(rounds):
    """Median over rounds of each quantile -> dict in microseconds."""
    p20, p50, p80 = (statistics.median(r[i] for r in rounds) * 1000 for i in range(3))
    return {"p20_us": p20, "median_us": p50, "p80_us": p80, "rounds_ms": rounds}


def environment(device):
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "device": str(device), "smoke": SMOKE}  # fmt: skip
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as error:
        info["triton"] = f"not importable: {error!r}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, cuda=torch.version.cuda, sm=f"{props.major}.{props.minor}",
                    memory_GB=props.total_memory / 1e9)  # fmt: skip
        try:
            import subprocess

            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()  # fmt: skip
        except Exception:
            info["driver"] = "unknown"
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


# --------------------------------------------------------------------------------------------


def plan(args):
    """[(call, dtype, dist, batch, levels, decoder_queries, heads, head_dim, implementations)]."""
    if not SMOKE:
        impls = ["triton", "grid_sample"] if msda_triton is not None else ["grid_sample"]
        return [(c, d, s, args.batch, ENCODER_LEVELS, DECODER_QUERIES, NUM_HEADS, HEAD_DIM, impls)
                for s in args.dists for c in args.calls for d in args.dtypes]  # location sets outermost: the training-like cases first  # fmt: skip
    # CPU smoke: a fixed small plan that still walks every code path (both calls, all three
    # location generators, a half dtype, the interpreted kernels) in well under a minute: the
    # grid_sample path at a small shape, the kernels in the interpreter at a tiny one (2 heads,
    # 8 programs) in fp32 (older interpreters lack bf16).
    half = next((d for d in args.dtypes if d != "fp32"), "bf16")
    runs = [("encoder", half, "train", args.batch, SMOKE_LEVELS, SMOKE_DECODER_QUERIES, NUM_HEADS, HEAD_DIM,
             ["grid_sample"]),
            ("decoder", "fp32", "uniform", args.batch, SMOKE_LEVELS, SMOKE_DECODER_QUERIES, NUM_HEADS, HEAD_DIM,
             ["grid_sample"])]  # fmt: skip
    if msda_triton is not None and msda_triton.INTERPRETED:
        runs.append(("decoder", "fp32", "concentrated", 1, TINY_LEVELS, 8, 2, 8, ["triton", "grid_sample"]))
    return runs


def reference_op(args, device):
    """(name, apply, why not) of the reference CUDA op for this run (CUDA only)."""
    if device.type != "cuda":
        return None, None, "no CUDA device: the reference op is CUDA only"
    if args.reference_unavailable:
        return None, None, args.reference_unavailable
    return find_reference_op(args.reference_build)


def measure_case(case, impl_names, reference_apply, args, bandwidth):
    """One case's correctness, memory and interleaved timings -> its JSON entry."""
    device = case.value.device
    names = list(impl_names) + (["reference"] if reference_apply is not None else [])
    builders = {"triton": triton_impl, "grid_sample": grid_sample_impl}
    if reference_apply is not None:
        builders["reference"] = reference_impl(reference_apply)
    impls = {name: builders[name](case) for name in names}
    entry = {**case.describe(), "bytes": compulsory_bytes(case), "correctness": {}, "timings": {}, "memory": {}}
    for name, (_, outputs_fn) in impls.items():
        entry["correctness"][name] = correctness(case, outputs_fn, checked=name != "grid_sample")
        entry["memory"][name] = memory_report(case, name, reference_apply)
    timings = {name: {mode: [] for mode in MODES} for name in impls}
    graph_timings = {name: [] for name in impls}
    for _ in range(args.rounds):  # interleaved: A B A B ...
        for mode in MODES:
            for name, (fns, _) in impls.items():
                timings[name][mode].append(quantiles_ms(fns[mode], args.warmup_ms, args.rep_ms))
        if device.type == "cuda" and case.call == "decoder":
            for name, (fns, _) in impls.items():
                try:
                    graph_timings[name].append(quantiles_ms(fns["fwd"], 0, args.rep_ms, cuda_graph=True))
                except Exception as error:  # e.g. an op that syncs cannot be captured
                    graph_timings[name] = f"not capturable: {error!r}"[:200]
    for name in impls:
        entry["timings"][name] = {mode: summarise(timings[name][mode]) for mode in MODES}
        for mode in MODES:
            t = entry["timings"][name][mode]
            t["hbm_roofline_pct"] = 100 * entry["bytes"][mode] / (t["median_us"] * 1e-6) / (bandwidth * 1e9)
        if isinstance(graph_timings[name], list) and graph_timings[name]:
            entry["timings"][name]["fwd_cudagraph"] = summarise(graph_timings[name])
        elif isinstance(graph_timings[name], str):
            entry["timings"][name]["fwd_cudagraph"] = graph_timings[name]
    return entry


def run(args, on_case=lambda results: None):
    """All cases of the plan; ``on_case(results)`` after each one (the JSON is rewritten there)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not SMOKE else "cpu")
    if SMOKE:
        args.rounds, args.warmup_ms, args.rep_ms = 1, 0.0, 20.0
        torch.set_num_threads(1)  # shared CI cores: one thread avoids oversubscription noise
    reference_name, reference_apply, reference_missing = reference_op(args, device)
    bandwidth = copy_bandwidth_GBps(device)
    results = {"environment": environment(device), "copy_bandwidth_GBps": bandwidth,
               "reference_op": reference_name, "reference_op_unavailable": reference_missing, "protocol": {
                   "rounds": args.rounds, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                   "timer": "triton.testing.do_bench (L2 flushed)" if device.type == "cuda" else "perf_counter",
                   "quantiles": [0.2, 0.5, 0.8],
                   "notes": "triton: the kernels' launchers called directly (the custom op adds only its "
                            "dispatch); bwd includes the fp32 grad_value zero-fill and cast. grid_sample and "
                            "reference: autograd, bwd = autograd.grad on a retained graph; the reference op is "
                            "fed fp32 inputs. Roofline bytes: compulsory traffic with fp32 locations/weights."},
               "cases": []}  # fmt: skip
    for call, dtype, dist, batch, levels, decoder_queries, heads, head_dim, impl_names in plan(args):
        case = make_case(call, dtype, dist, batch, levels, decoder_queries, device, heads, head_dim)
        results["cases"].append(measure_case(case, impl_names, reference_apply, args, bandwidth))
        on_case(results)
        del case
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def format_table(results):
    lines = [
        f"device: {results['environment'].get('gpu', results['environment']['device'])}  "
        f"torch {results['environment']['torch']}  triton {results['environment']['triton']}  "
        f"copy bandwidth {results['copy_bandwidth_GBps']:.0f} GB/s  reference op: "
        f"{results['reference_op'] or 'none (' + str(results['reference_op_unavailable']) + ')'}",
        f"{'call':8} {'dtype':5} {'locations':12} {'B':>2} {'S':>6} {'Q':>6} {'impl':12} {'mode':8} "
        f"{'median us':>10} {'p20-p80 us':>17} {'x grid_s':>8} {'% HBM':>6} {'saved MB':>9} {'correct':>7}",
    ]
    for entry in results["cases"]:
        base = entry["timings"].get("grid_sample", {})
        for name, modes in entry["timings"].items():
            oks = [v["ok"] for v in entry["correctness"][name].values()]
            ok = "-" if None in oks else ("yes" if all(oks) else "NO")
            for mode in MODES:
                t = modes[mode]
                speedup = base[mode]["median_us"] / t["median_us"] if base else float("nan")
                lines.append(
                    f"{entry['call']:8} {entry['value_dtype']:5} {entry['locations']:12} {entry['B']:>2} "
                    f"{entry['S']:>6} {entry['Q']:>6} {name:12} {mode:8} {t['median_us']:>10.1f} "
                    f"{t['p20_us']:>8.1f}-{t['p80_us']:<8.1f} {speedup:>8.2f} {t['hbm_roofline_pct']:>6.1f} "
                    f"{entry['memory'][name]['saved_for_backward_MB']:>9.2f} {ok:>7}"
                )
            graph = modes.get("fwd_cudagraph")
            if isinstance(graph, dict):
                lines.append(f"{'':45} {name:12} {'fwd graph':8} {graph['median_us']:>10.1f}")
    return "\n".join(lines)


def write_json(results):
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".part")
    partial.write_text(json.dumps(results, indent=1))
    os.replace(partial, args.out)  # never a half-written file, even when stopped from outside


def main():
    results = run(args, on_case=write_json)
    write_json(results)
    print(format_table(results))
    print(f"wrote {args.out}")
    failed = [(e["call"], e["value_dtype"], e["locations"], name)
              for e in results["cases"] for name, c in e["correctness"].items()
              if any(v["ok"] is False for v in c.values())]  # fmt: skip
    ours = [f for f in failed if f[-1] != "reference"]
    if failed:
        # The reference op is someone else's code: its disagreement is reported, not fatal.
        print(f"correctness check FAILED for {failed}", file=sys.stderr)
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main())
