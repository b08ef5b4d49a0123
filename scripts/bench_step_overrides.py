"""Training-step time of config variants, side by side in one process: the ratio a switch buys.

Each variant is the quickstart (or ``--setup r50``) with extra Hydra overrides; the variants are
built once, warmed up, then timed in interleaved rounds (A, B, A, B, ...) so that a machine that
slows down or speeds up during the run affects them alike. The step is the one of
``scripts/profile_step.py`` (data, forward, criterion, backward, clipping, optimizer step), without
Lightning. The first variant is the reference of the ratio column.

    python scripts/bench_step_overrides.py --threads 2 "optimizer.fused=false" ""
    python scripts/bench_step_overrides.py --threads 1 "optimizer.fused=false" "" "optimizer.fused=false +optimizer.foreach=true"

A variant is one string of space-separated overrides; "" is the config as it stands. State the
thread count with the figures, and run nothing else meanwhile (2 torch processes on 2 cores slow
each other several-fold).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import profile_step  # noqa: E402  (the step and the builder this benchmark shares)
from bench_inference import cpu_name  # noqa: E402


def build_variant(setup: str, overrides: list[str]):
    """The data iterator and training objects of one variant, warmed up with 3 steps."""
    cfg, datamodule, model, criterion, optimizer, clip = profile_step.build(setup, None, overrides)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batches = profile_step.infinite(datamodule.train_dataloader())
    profile_step.run_steps(profile_step.Regions(), batches, model, criterion, optimizer, clip, 3, int(cfg.seed))
    return batches, model, criterion, optimizer, clip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help='each a string of overrides ("" = the config as it stands)')
    parser.add_argument("--setup", choices=sorted(profile_step.SETUPS), default="quickstart")
    parser.add_argument("--threads", type=int, required=True, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="steps per variant per round")
    args = parser.parse_args(argv)
    if len(args.variants) < 2:
        parser.error('give at least two variants, e.g. "" "optimizer.fused=true"')

    torch.set_num_threads(args.threads)
    built = {v: build_variant(args.setup, v.split()) for v in args.variants}
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for r in range(args.rounds):
        for variant, (batches, model, criterion, optimizer, clip) in built.items():
            seed = 1000 + r * args.steps  # the same generator seeds for every variant in a round
            times[variant] += profile_step.run_steps(profile_step.Regions(), batches, model, criterion, optimizer,
                                                     clip, args.steps, seed)

    reference = statistics.median(times[args.variants[0]])
    print(f"{args.setup} training step, {args.threads} thread(s) of {os.cpu_count()} cores, {cpu_name()}, "
          f"torch {torch.__version__}; {args.rounds} interleaved rounds x {args.steps} steps per variant\n")
    print("| variant | median ms | mean ms | p90 ms | vs first |")
    print("|---|---:|---:|---:|---:|")
    for variant, values in times.items():
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
        median = statistics.median(values)
        print(f"| {variant or '(as configured)'} | {median * 1e3:.1f} | {statistics.mean(values) * 1e3:.1f} | "
              f"{p90 * 1e3:.1f} | {reference / median:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
