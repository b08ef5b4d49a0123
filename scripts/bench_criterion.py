"""Time DAC-DETR's criterion on a realistic output dict (no model needed).

The official R50 training shape: batch 2, 900 queries, 91 classes, 6 decoder layers, DAC on
(C-stream + one-to-many on every layer), CDN on (S = 20 GTs per image -> G = 200 // 40 = 5 groups,
200 DN slots), two-stage encoder outputs over all encoder tokens (~20k for a ~800x1100 image:
100x138 + 50x69 + 25x35 + 13x18 = 18,508), and 20 objects per image.

    python scripts/bench_criterion.py [--device cpu|cuda] [--repeats 5] [--tokens 18508] [--no-reference]

Prints the median wall time of the forward pass and of forward + backward, the number of
operator calls of one forward + backward (top-level ``aten::`` calls under ``torch.profiler``: a
proxy for GPU kernel launches) and the number of loss terms, for the package's batched criterion
and, side by side in the same run (interleaved repeats), for the frozen per-layer reference
``tests/reference_criterion.py`` (the criterion before batching). The two must give the same
total loss.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from dac_detr.losses import HungarianMatcher, OneToManyAssigner, SetCriterion


def random_layer(batch: int, queries: int, num_classes: int, device: torch.device,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
    logits = torch.randn(batch, queries, num_classes, generator=generator) * 2 - 4
    centres = torch.rand(batch, queries, 2, generator=generator) * 0.8 + 0.1
    sizes = torch.rand(batch, queries, 2, generator=generator) * 0.3 + 0.02
    return {"pred_logits": logits.to(device).requires_grad_(),
            "pred_boxes": torch.cat([centres, sizes], -1).to(device).requires_grad_()}


def build_inputs(batch: int, queries: int, num_classes: int, layers: int, tokens: int, objects: int,
                 device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        centres = torch.rand(objects, 2, generator=g) * 0.8 + 0.1
        sizes = torch.rand(objects, 2, generator=g) * 0.3 + 0.02
        targets.append({"labels": torch.randint(1, num_classes, (objects,), generator=g).to(device),
                        "boxes": torch.cat([centres, sizes], -1).to(device)})
    num_groups = max(1, 200 // (2 * objects))
    pad = 2 * objects * num_groups
    o = [random_layer(batch, queries, num_classes, device, g) for _ in range(layers)]
    outputs = {
        "pred_logits": o[-1]["pred_logits"], "pred_boxes": o[-1]["pred_boxes"], "aux_outputs": o[:-1],
        "c_outputs": [random_layer(batch, queries, num_classes, device, g) for _ in range(layers)],
        "enc_outputs": random_layer(batch, tokens, num_classes, device, g),
        "dn_outputs": {"o": [random_layer(batch, pad, num_classes, device, g) for _ in range(layers)],
                       "c": [random_layer(batch, pad, num_classes, device, g) for _ in range(layers)]},
        "dn_meta": {"num_groups": num_groups, "single_pad": objects, "pad_size": pad},
    }
    return outputs, targets


def leaves(outputs) -> list[torch.Tensor]:
    found = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(outputs)
    return found


def reference_criterion(num_classes: int):
    """The frozen per-layer criterion of tests/reference_criterion.py, same settings."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import reference_criterion as reference

    return reference.SetCriterion(num_classes, reference.HungarianMatcher(), reference.OneToManyAssigner())


def operator_calls(run) -> int:
    """Top-level aten:: calls (not nested in another aten:: call) of ``run()``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    count = 0
    for event in prof.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        count += parent is None
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--queries", type=int, default=900)
    parser.add_argument("--classes", type=int, default=91)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=18508)
    parser.add_argument("--objects", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--no-reference", action="store_true", help="time the package's criterion only")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    criteria = {"batched": SetCriterion(args.classes, HungarianMatcher(), OneToManyAssigner())}
    if not args.no_reference:
        criteria["per-layer reference"] = reference_criterion(args.classes)
    outputs, targets = build_inputs(args.batch, args.queries, args.classes, args.layers, args.tokens,
                                    args.objects, device)
    generator = torch.Generator(device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(criterion, seed):
        generator.manual_seed(seed)
        for t in leaves(outputs):
            t.grad = None
        sync()
        start = time.perf_counter()
        terms = criterion(outputs, targets, generator=generator)
        loss = torch.stack([v for k, v in terms.items() if k.startswith("loss_")]).sum()
        sync()
        mid = time.perf_counter()
        loss.backward()
        sync()
        return mid - start, time.perf_counter() - start, terms, loss

    times = {name: ([], []) for name in criteria}
    results = {}
    for repeat in range(args.repeats + 1):  # the first round warms up; the criteria alternate
        for name, criterion in criteria.items():
            forward, total, terms, loss = step(criterion, repeat)
            results[name] = (terms, loss)
            if repeat > 0:
                times[name][0].append(forward)
                times[name][1].append(total)
    calls = {name: operator_calls(lambda c=criterion: step(c, 0)) for name, criterion in criteria.items()}

    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} queries={args.queries} "
          f"classes={args.classes} layers={args.layers} enc_tokens={args.tokens} objects/image={args.objects} "
          f"dn_groups={outputs['dn_meta']['num_groups']}, {args.repeats} interleaved repeats")
    print(f"| {'criterion':20} | {'terms':>5} | {'total loss':>12} | {'forward ms':>10} | {'fwd+bwd ms':>10} | {'aten calls':>10} |")
    print(f"|{'-' * 22}|{'-' * 7}|{'-' * 14}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    for name in criteria:
        terms, loss = results[name]
        num_terms = sum(k.startswith("loss_") for k in terms)
        print(f"| {name:20} | {num_terms:5d} | {loss.item():12.4f} | {statistics.median(times[name][0]) * 1e3:10.1f} | "
              f"{statistics.median(times[name][1]) * 1e3:10.1f} | {calls[name]:10d} |")
    if len(criteria) == 2:
        (new, old) = criteria
        ratio = statistics.median(times[old][1]) / statistics.median(times[new][1])
        print(f"batched vs reference: forward + backward {ratio:.2f}x faster, "
              f"{calls[old] / calls[new]:.2f}x fewer operator calls")


if __name__ == "__main__":
    main()
