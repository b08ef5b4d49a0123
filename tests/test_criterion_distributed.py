"""The normaliser N is averaged over processes (torch.distributed, gloo, 2 CPU processes)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dac_detr.losses import HungarianMatcher, OneToManyAssigner, SetCriterion

GT_PER_RANK = {0: 1, 1: 3}  # N = (1 + 3) / 2 = 2 on both ranks


def _inputs(rank: int):
    gen = torch.Generator().manual_seed(rank)
    n = GT_PER_RANK[rank]
    targets = [{"labels": torch.randint(0, 3, (n,), generator=gen),
                "boxes": torch.cat([torch.rand(n, 2, generator=gen) * 0.6 + 0.2,
                                    torch.rand(n, 2, generator=gen) * 0.3 + 0.05], -1)}]

    def layer():
        return {"pred_logits": torch.randn(1, 8, 3, generator=gen),
                "pred_boxes": torch.cat([torch.rand(1, 8, 2, generator=gen) * 0.6 + 0.2,
                                         torch.rand(1, 8, 2, generator=gen) * 0.3 + 0.05], -1)}
    last = layer()
    outputs = {**last, "aux_outputs": [], "c_outputs": [layer()], "enc_outputs": layer()}
    return outputs, targets


def _worker(rank: int, world: int, tmpdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmpdir, 'store')}", rank=rank,
                            world_size=world)
    try:
        outputs, targets = _inputs(rank)
        criterion = SetCriterion(3, HungarianMatcher(), OneToManyAssigner())
        terms = criterion(outputs, targets)
        with open(os.path.join(tmpdir, f"rank{rank}.json"), "w") as f:
            json.dump({k: v.item() for k, v in terms.items()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_normaliser_is_averaged_across_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank, n_local in GT_PER_RANK.items():
        with open(tmp_path / f"rank{rank}.json") as f:
            distributed = json.load(f)
        outputs, targets = _inputs(rank)
        local = SetCriterion(3, HungarianMatcher(), OneToManyAssigner())(outputs, targets)
        n_avg = sum(GT_PER_RANK.values()) / len(GT_PER_RANK)
        for name, value in local.items():
            if name.startswith("stat_"):
                assert distributed[name] == value.item()
                continue
            # local run: N = n_local; distributed: N = n_avg (o2m: 3N for both)
            assert abs(distributed[name] * n_avg - value.item() * n_local) <= 1e-5 * abs(value.item() * n_local), name
