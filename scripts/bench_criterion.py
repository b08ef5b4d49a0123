"""Time DAC-DETR's criterion on a realistic output dict (no model needed).

The official R50 training shape: batch 2, 900 queries, 91 classes, 6 decoder layers, DAC on
(C-stream + one-to-many on every layer), CDN on (S = 20 GTs per image -> G = 200 // 40 = 5 groups,
200 DN slots), two-stage encoder outputs over all encoder tokens (~20k for a ~800x1100 image:
100x138 + 50x69 + 25x35 + 13x18 = 18,508), and 20 objects per image.

    python scripts/bench_criterion.py [--device cpu|cuda] [--repeats 5] [--tokens 18508]

Prints the median wall time of the forward pass and of forward + backward, and the number of
loss terms.
"""

from __future__ import annotations

import argparse
import statistics
import time

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
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    criterion = SetCriterion(args.classes, HungarianMatcher(), OneToManyAssigner())
    outputs, targets = build_inputs(args.batch, args.queries, args.classes, args.layers, args.tokens,
                                    args.objects, device)
    generator = torch.Generator(device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    forward_times, total_times = [], []
    for step in range(args.repeats + 1):  # the first run warms up
        generator.manual_seed(step)
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
        end = time.perf_counter()
        if step > 0:
            forward_times.append(mid - start)
            total_times.append(end - start)

    num_terms = sum(k.startswith("loss_") for k in terms)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch} queries={args.queries} "
          f"classes={args.classes} layers={args.layers} enc_tokens={args.tokens} objects/image={args.objects} "
          f"dn_groups={outputs['dn_meta']['num_groups']}")
    print(f"loss terms: {num_terms}, total loss {loss.item():.4f}")
    print(f"criterion forward: median {statistics.median(forward_times) * 1e3:.1f} ms "
          f"(min {min(forward_times) * 1e3:.1f}) over {args.repeats} runs")
    print(f"forward + backward: median {statistics.median(total_times) * 1e3:.1f} ms "
          f"(min {min(total_times) * 1e3:.1f})")


if __name__ == "__main__":
    main()
