"""Where a DAC-DETR training step spends its time: a breakdown table and operator counts.

Builds the run from the Hydra config exactly as ``python -m dac_detr.train`` does (data module,
detector, criterion, AdamW groups) and runs training steps by hand: data loading, forward,
criterion, backward, gradient clipping at the trainer's ``gradient_clip_val`` and the optimizer
step. Two setups:

* ``quickstart`` (default): the bare ``python -m dac_detr.train`` (tiny model, synthetic data,
  64 px, batch 8);
* ``r50``: the official R50 model (``model=dac_detr backbone=r50``, random weights, no download)
  on the synthetic data at a small image size (``--image-size``, default 224: enough encoder tokens for 900 queries), batch 2.

Two passes over the same steps: a timed pass (wall clock per region, no profiler: the profiler's
own cost per operator would inflate exactly the operator-bound parts) and a ``torch.profiler``
pass that counts the operator calls in each region (top-level ``aten::`` calls, i.e. not nested
in another operator: on a GPU each is roughly one kernel launch or host round trip). The regions
are data, backbone, encoder, CDN, decoder O-stream, decoder C-stream, other forward (input
projections, heads, proposals), matcher, assigner, criterion (the rest of it: the losses),
backward, optimizer (clipping + step). Regions are exclusive (a parent's figure excludes its
children), so the rows add up to the step.

    python scripts/profile_step.py [--setup quickstart|r50] [--steps 20] [--warmup 3] [--json out.json]

Run timings on a quiet core with one thread (``OMP_NUM_THREADS=1``) and state the thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SETUPS = {
    "quickstart": [],
    # the official R50 model on the synthetic set at a small size; random weights (no download)
    "r50": ["model=dac_detr", "backbone=r50", "backbone.pretrained=null", "data.batch_size=2"],
}
REGION_ORDER = ("data", "backbone", "encoder", "cdn", "decoder_o", "decoder_c", "forward_other", "matcher",
                "assigner", "criterion_other", "backward", "optimizer")  # fmt: skip


class Regions:
    """Nested wall-clock regions: exclusive seconds and, under the profiler, a record_function."""

    def __init__(self) -> None:
        self.exclusive: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start, time spent in children]
        self.profiling = False

    @contextlib.contextmanager
    def region(self, name: str):
        record = torch.profiler.record_function(f"region::{name}") if self.profiling else contextlib.nullcontext()
        with record:
            frame = [name, time.perf_counter(), 0.0]
            self._stack.append(frame)
            try:
                yield
            finally:
                self._stack.pop()
                total = time.perf_counter() - frame[1]
                self.exclusive[name] = self.exclusive.get(name, 0.0) + total - frame[2]
                if self._stack:
                    self._stack[-1][2] += total

    def wrap(self, owner, attribute: str, name: str) -> None:
        """Make ``owner.attribute(...)`` run inside region ``name`` (an instance-level patch)."""
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            with self.region(name):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapped)


def instrument(regions: Regions, model, criterion) -> None:
    """Regions around the detector's parts and the criterion's matcher and assigner."""
    import dac_detr.models.detector as detector_module

    regions.wrap(model.backbone, "forward", "backbone")
    regions.wrap(model.transformer.encoder, "forward", "encoder")
    regions.wrap(detector_module, "build_cdn_queries", "cdn")
    for layer in model.transformer.decoder.layers:
        # per layer: self_attention (O), then cross_attention_ffn for O and then, in training with
        # DAC, for C with the same module (transformer.DACDecoder.forward)
        calls = {"n": 0}
        self_attention, cross = layer.self_attention, layer.cross_attention_ffn

        def timed_self_attention(*args, _f=self_attention, _calls=calls, **kwargs):
            _calls["n"] = 0
            with regions.region("decoder_o"):
                return _f(*args, **kwargs)

        def timed_cross(*args, _f=cross, _calls=calls, **kwargs):
            stream = "decoder_o" if _calls["n"] == 0 else "decoder_c"
            _calls["n"] += 1
            with regions.region(stream):
                return _f(*args, **kwargs)

        layer.self_attention, layer.cross_attention_ffn = timed_self_attention, timed_cross
    for attribute in ("forward", "match_layers"):
        if hasattr(criterion.matcher, attribute):
            regions.wrap(criterion.matcher, attribute, "matcher")
    if criterion.assigner is not None:
        for attribute in ("forward", "assign_layers"):
            if hasattr(criterion.assigner, attribute):
                regions.wrap(criterion.assigner, attribute, "assigner")


def build(setup: str, image_size: int | None, extra: list[str]):
    from hydra import compose, initialize_config_module

    from dac_detr.utils.instantiate import build_datamodule, build_module

    overrides = list(SETUPS[setup]) + list(extra)
    if image_size:
        overrides += [f"data.image_size={image_size}", f"data.train_scales=[{image_size}]",
                      f"data.train_max_size={image_size * 2}", f"data.crop_resize_scales=[{image_size}]",
                      f"data.crop_min_size={image_size // 2}", f"data.crop_max_size={image_size}"]  # fmt: skip
    with initialize_config_module(config_module="dac_detr.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    torch.manual_seed(int(cfg.seed))
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.num_classes)
    optimizer = module.configure_optimizers()["optimizer"]
    clip = cfg.trainer.get("gradient_clip_val") or 0.0
    return cfg, datamodule, module.model.train(), module.criterion, optimizer, float(clip)


def reference_criterion(cfg, num_classes: int):
    """The same loss config built with the frozen per-layer classes of tests/reference_criterion.py."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    loss["_target_"] = "reference_criterion.SetCriterion"
    loss["matcher"]["_target_"] = "reference_criterion.HungarianMatcher"
    if loss.get("assigner"):
        loss["assigner"]["_target_"] = "reference_criterion.OneToManyAssigner"
    return instantiate(loss, num_classes=num_classes)


def run_steps(regions: Regions, loader_iter, model, criterion, optimizer, clip: float, steps: int, seed: int) -> list[float]:
    """``steps`` training steps; returns each step's wall time (s)."""
    times = []
    for step in range(steps):
        start = time.perf_counter()
        with regions.region("data"):
            images, pixel_mask, targets = next(loader_iter)
        generator = torch.Generator().manual_seed(seed + step)
        with regions.region("forward_other"):
            outputs = model(images, pixel_mask, targets=targets, generator=generator)
        with regions.region("criterion_other"):
            terms = criterion(outputs, targets, generator=generator)
            loss = torch.stack([v for k, v in terms.items() if k.startswith("loss_")]).sum()
        optimizer.zero_grad(set_to_none=True)
        with regions.region("backward"):
            loss.backward()
        with regions.region("optimizer"):
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def operator_counts(prof, steps: int) -> dict[str, float]:
    """Top-level aten:: calls per step in each (innermost) region."""
    counts: dict[str, int] = {}
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent, region = event.cpu_parent, None
        nested = False
        while parent is not None:
            if parent.name.startswith("aten::"):
                nested = True
                break
            if region is None and parent.name.startswith("region::"):
                region = parent.name[len("region::"):]
            parent = parent.cpu_parent
        if not nested:
            counts[region or "outside"] = counts.get(region or "outside", 0) + 1
    return {name: n / steps for name, n in counts.items()}


def infinite(loader):
    while True:
        yield from loader


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=sorted(SETUPS), default="quickstart")
    parser.add_argument("--image-size", type=int, default=None, help="shorter side (r50 default 224; quickstart keeps its scales)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps under torch.profiler (0: skip)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--reference-criterion", action="store_true",
                        help="use the frozen per-layer criterion of tests/reference_criterion.py (the one before batching)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (key=value)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("DAC_DETR_MSDA", "torch")
    image_size = args.image_size or (224 if args.setup == "r50" else None)
    cfg, datamodule, model, criterion, optimizer, clip = build(args.setup, image_size, args.overrides)
    if args.reference_criterion:
        criterion = reference_criterion(cfg, datamodule.num_classes)
    regions = Regions()
    instrument(regions, model, criterion)
    batches = infinite(datamodule.train_dataloader())
    seed = int(cfg.seed)

    run_steps(regions, batches, model, criterion, optimizer, clip, args.warmup, seed)
    regions.exclusive.clear()
    step_times = run_steps(regions, batches, model, criterion, optimizer, clip, args.steps, seed)
    per_step_ms = {name: regions.exclusive.get(name, 0.0) / args.steps * 1e3 for name in REGION_ORDER}

    ops: dict[str, float] = {}
    if args.profile_steps > 0:
        regions.profiling = True
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run_steps(regions, batches, model, criterion, optimizer, clip, args.profile_steps, seed)
        regions.profiling = False
        ops = operator_counts(prof, args.profile_steps)

    result = {
        "setup": args.setup, "criterion": "reference" if args.reference_criterion else "package", "overrides": SETUPS[args.setup] + args.overrides, "image_size": image_size,
        "batch_size": int(cfg.data.batch_size), "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "steps": args.steps, "step_ms_median": statistics.median(step_times) * 1e3,
        "step_ms_mean": statistics.fmean(step_times) * 1e3, "region_ms": per_step_ms, "region_ops": ops,
    }  # fmt: skip
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def print_table(result: dict) -> None:
    total_ms = sum(result["region_ms"].values())
    ops = result["region_ops"]
    print(f"setup={result['setup']} criterion={result['criterion']} batch={result['batch_size']} threads={result['threads']} torch={result['torch']} "
          f"steps={result['steps']}: step median {result['step_ms_median']:.1f} ms, mean {result['step_ms_mean']:.1f} ms")  # fmt: skip
    print(f"| {'region':16} | {'ms/step':>8} | {'share':>6} | {'ops/step':>8} |")
    print(f"|{'-' * 18}|{'-' * 10}|{'-' * 8}|{'-' * 10}|")
    for name in REGION_ORDER:
        ms = result["region_ms"][name]
        count = f"{ops[name]:.0f}" if name in ops else "-"
        print(f"| {name:16} | {ms:8.1f} | {ms / total_ms:6.1%} | {count:>8} |")
    total_ops = f"{sum(ops.values()):.0f}" if ops else "-"
    print(f"| {'total':16} | {total_ms:8.1f} | {1:6.1%} | {total_ops:>8} |")


if __name__ == "__main__":
    sys.exit(main())
