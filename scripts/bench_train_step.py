"""One DAC-DETR training step: step time and peak memory, Triton op against the grid_sample path,
DAC on and off (docs/kernels.md, Benchmark protocol: "the number users feel").

The step is what a training iteration does: forward of the detector (R50, 6+6 layers, 900
queries, CDN, two-stage, box refinement, as ``conf/model/dac_detr.yaml``), the criterion
(IA-BCE, Hungarian + one-to-many assignment), backward, gradient clipping at 0.1 and an AdamW
step, under bf16 autocast. Inputs: B = 2 images padded to 800x1333 (the second one 800x1200 of
valid pixels), random boxes. Weights are randomly initialised: the timing does not depend on them.

The deformable-attention backend is switched with ``DAC_DETR_MSDA`` (``triton`` / ``torch``),
which the op reads on every call; the four variants (backend x DAC) are interleaved over rounds
in one process. Results go to JSON (default ``scripts/results/bench_train_step.json``) and a
table.

Without CUDA (or with ``--cpu-smoke``) it runs a reduced CPU mode so CI can check the script:
the tiny model of ``conf/model/tiny.yaml`` on a frozen ResNet-18 at 2x64x96 with 5 classes,
fp32, the grid_sample path only (the interpreted kernels would take minutes here), one timed step
per variant.

    python scripts/bench_train_step.py
    python scripts/bench_train_step.py --cpu-smoke --out /tmp/step.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dac_detr.kernels import ops as msda_ops
from dac_detr.losses import HungarianMatcher, OneToManyAssigner, SetCriterion
from dac_detr.models import DACDETR, ResNetBackbone

FULL = {
    "backbone": "resnet50", "train_layers": ("layer2", "layer3", "layer4"), "num_classes": 91,
    "image_hw": (800, 1333), "second_valid_hw": (800, 1200), "batch": 2,
    "model": {},  # DACDETR defaults are the official sizes (conf/model/dac_detr.yaml)
}  # fmt: skip
# CPU smoke: a frozen ResNet-18, 5 classes, 64x96 images (levels 8x12 ... 1x2): seconds per step.
SMOKE = {
    "backbone": "resnet18", "train_layers": (), "num_classes": 5,
    "image_hw": (64, 96), "second_valid_hw": (56, 80), "batch": 2,
    "model": {"hidden_dim": 64, "nheads": 4, "num_encoder_layers": 2, "num_decoder_layers": 2,
              "dim_feedforward": 128, "num_queries": 30, "dn_number": 10},  # conf/model/tiny.yaml
}  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="reduced CPU mode (automatic without CUDA)")
    parser.add_argument("--backends", default="triton,torch", help="comma list of MSDA backends: triton, torch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant and round")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "bench_train_step.json"
    )
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in args.backends if b not in ("triton", "torch")]
    if bad or not args.backends:
        parser.error(f"--backends: {bad or 'nothing'} not in ('triton', 'torch')")
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")
    return args


def make_batch(setup, device, generator):
    """Normalised random images padded bottom-right, the DETR pixel mask, random targets."""
    B = setup["batch"]
    H, W = setup["image_hw"]
    images = torch.randn(B, 3, H, W, generator=generator).to(device)
    pixel_mask = torch.zeros(B, H, W, dtype=torch.bool)
    valid = [(H, W), setup["second_valid_hw"]] + [(H, W)] * (B - 2)
    targets = []
    for i, (vh, vw) in enumerate(valid[:B]):
        pixel_mask[i, vh:, :] = True
        pixel_mask[i, :, vw:] = True
        images[i, :, vh:, :] = 0
        images[i, :, :, vw:] = 0
        n = 7 + 5 * i
        centres = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        targets.append({
            "labels": torch.randint(0, setup["num_classes"], (n,), generator=generator).to(device),
            "boxes": torch.cat([centres, sizes], 1).to(device),
            "image_id": torch.tensor(i, device=device),
            "orig_size": torch.tensor([vh, vw], device=device),
            "size": torch.tensor([vh, vw], device=device),
        })  # fmt: skip
    return images, pixel_mask.to(device), targets


def build(setup, dac_enabled, device, seed):
    torch.manual_seed(seed)  # same weights for every variant with the same DAC setting
    backbone = ResNetBackbone(setup["backbone"], train_layers=setup["train_layers"])
    num_classes = setup["num_classes"]
    model = DACDETR(backbone, num_classes, dac_enabled=dac_enabled, **setup["model"]).to(device)
    criterion = SetCriterion(
        num_classes,
        HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0),
        OneToManyAssigner(score_weights=(0.3, 0.7), threshold=0.4, topk=6, low_quality_matches=True,
                          max_positives=75) if dac_enabled else None,  # fmt: skip
        cls_loss="ia_bce",
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    return model.train(), criterion, optimizer


def train_step(model, criterion, optimizer, batch, autocast_dtype):
    images, pixel_mask, targets = batch
    device_type = images.device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        outputs = model(images, pixel_mask, targets)
        terms = criterion(outputs, targets)
    loss = sum(v for k, v in terms.items() if k.startswith("loss_"))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()
    return loss.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(variant, args, device, autocast_dtype):
    """Step times (ms) of one round and the peak memory of one step (MB, CUDA only)."""
    os.environ[msda_ops.BACKEND_ENV] = variant["backend"]
    model, criterion, optimizer, batch = variant["model"], variant["criterion"], variant["optimizer"], variant["batch"]
    for _ in range(args.warmup):
        train_step(model, criterion, optimizer, batch, autocast_dtype)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        loss = train_step(model, criterion, optimizer, batch, autocast_dtype)
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()} for {variant['name']}")
    peak = torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None
    return times, peak


def environment(device):
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as error:
        info["triton"] = f"not importable: {error!r}"
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def main(argv=None):
    args = parse_args(argv)
    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    setup = SMOKE if smoke else FULL
    backends = args.backends
    if smoke:
        backends = ["torch"]
        args.warmup, args.steps, args.rounds = 0, 1, 1
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    elif "triton" in backends and msda_ops.msda_triton is None:
        print(f"triton does not import ({msda_ops.TRITON_IMPORT_ERROR!r}): timing the grid_sample path only")
        backends = [b for b in backends if b != "triton"]
    autocast_dtype = None if smoke else torch.bfloat16
    previous_backend = os.environ.get(msda_ops.BACKEND_ENV)

    generator = torch.Generator().manual_seed(args.seed)
    batch = make_batch(setup, device, generator)
    variants = []
    for dac_enabled in (True, False):
        for backend in backends:
            model, criterion, optimizer = build(setup, dac_enabled, device, args.seed)
            name = f"{backend}/dac_{'on' if dac_enabled else 'off'}"
            variants.append({"name": name, "backend": backend, "dac": dac_enabled, "model": model,
                             "criterion": criterion, "optimizer": optimizer, "batch": batch})  # fmt: skip

    times = {v["name"]: [] for v in variants}
    peaks = {v["name"]: [] for v in variants}
    try:
        for _ in range(args.rounds):  # interleaved A B C D A B C D ...
            for variant in variants:
                round_times, peak = measure(variant, args, device, autocast_dtype)
                times[variant["name"]].extend(round_times)
                peaks[variant["name"]].append(peak)
    finally:
        if previous_backend is None:
            os.environ.pop(msda_ops.BACKEND_ENV, None)
        else:
            os.environ[msda_ops.BACKEND_ENV] = previous_backend

    results = {
        "environment": environment(device),
        "smoke": smoke,
        "setup": {"backbone": setup["backbone"], "image_hw": setup["image_hw"], "batch": setup["batch"],
                  "second_valid_hw": setup["second_valid_hw"], "model_overrides": setup["model"],
                  "precision": "bf16-mixed" if autocast_dtype is not None else "fp32",
                  "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds},  # fmt: skip
        "variants": {},
    }
    for variant in variants:
        name = variant["name"]
        ts = sorted(times[name])
        q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else [ts[0]] * 9
        results["variants"][name] = {
            "backend": variant["backend"], "dac": variant["dac"], "step_ms_median": statistics.median(ts),
            "step_ms_p20": q[1], "step_ms_p80": q[7], "step_ms_all": times[name],
            "peak_memory_MB": max(peaks[name]) if peaks[name][0] is not None else None,
        }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))

    env = results["environment"]
    print(f"device: {env.get('gpu', env['device'])}  torch {env['torch']}  triton {env['triton']}  "
          f"precision {results['setup']['precision']}  image {setup['image_hw']} x{setup['batch']}")  # fmt: skip
    print(f"{'variant':18} {'median ms':>10} {'p20-p80 ms':>19} {'peak MB':>9} {'vs torch':>8}")
    for name, r in results["variants"].items():
        base = results["variants"].get(f"torch/dac_{'on' if r['dac'] else 'off'}")
        speedup = base["step_ms_median"] / r["step_ms_median"] if base else float("nan")
        peak = f"{r['peak_memory_MB']:.0f}" if r["peak_memory_MB"] is not None else "-"
        print(f"{name:18} {r['step_ms_median']:>10.1f} {r['step_ms_p20']:>9.1f}-{r['step_ms_p80']:<9.1f} "
              f"{peak:>9} {speedup:>8.2f}")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
