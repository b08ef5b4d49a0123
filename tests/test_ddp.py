"""DDP without the unused-parameter search (``trainer=ddp`` / ``ddp_sim``): every trainable
parameter must reach the training loss on every step, including steps whose images have no
object (no DN queries, no positives). 2 CPU processes with gloo, the real configs and criterion."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from dac_detr.utils.instantiate import build_detector
from test_train_helpers import compose_train

NUM_CLASSES = 5
# (rank 0's GT counts, rank 1's GT counts) per step; a parameter without gradient at step k
# makes DDP fail at the forward of step k + 1, so the last step only has to run.
STEPS = [((0, 0), (0, 0)), ((0, 0), (2, 1)), ((1, 3), (2, 0)), ((0, 0), (0, 0)), ((1, 1), (1, 1))]
CONFIGS = {
    "official switches (two-stage)": [],
    "no two-stage (DN boxes through pos_trans)": ["model.two_stage=false", "model.mixed_selection=false"],
}


class TrainingLoss(nn.Module):
    """The detector and the criterion as one module: forward returns the summed ``loss_*`` terms."""

    def __init__(self, model: nn.Module, criterion: nn.Module):
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, images, pixel_mask, targets, seed: int):
        generator = torch.Generator().manual_seed(seed)
        outputs = self.model(images, pixel_mask, targets=targets, generator=generator)
        terms = self.criterion(outputs, targets, generator=generator)
        return torch.stack([v for k, v in terms.items() if k.startswith("loss_")]).sum()


def _build(overrides: list[str]) -> TrainingLoss:
    cfg = compose_train(overrides)
    torch.manual_seed(0)  # the same initial weights on both ranks
    model = build_detector(cfg, NUM_CLASSES)
    model.train()
    return TrainingLoss(model, instantiate(cfg.loss, num_classes=NUM_CLASSES))


def _batch(counts, seed: int, size: int = 64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(counts), 3, size, size, generator=g)
    pixel_mask = torch.zeros(len(counts), size, size, dtype=torch.bool)
    targets = []
    for n in counts:
        centre, wh = 0.3 + 0.4 * torch.rand(n, 2, generator=g), 0.1 + 0.2 * torch.rand(n, 2, generator=g)
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g), "boxes": torch.cat([centre, wh], 1)})
    return images, pixel_mask, targets


def _worker(rank: int, world: int, port: int, overrides: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    result: dict = {"steps": 0}
    try:
        ddp = nn.parallel.DistributedDataParallel(_build(overrides), find_unused_parameters=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-4)
        for step, counts in enumerate(STEPS):
            loss = ddp(*_batch(counts[rank], seed=100 * step + rank), step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            result["steps"] = step + 1
    except Exception as error:  # reported to the test instead of a hung peer
        result["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("overrides", list(CONFIGS.values()), ids=list(CONFIGS))
def test_every_parameter_reaches_the_loss_of_a_batch_without_objects(overrides):
    module = _build(overrides)
    module(*_batch((0, 0), seed=0), 0).backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], f"no gradient from an all-empty batch: {missing}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overrides", list(CONFIGS.values()), ids=list(CONFIGS))
def test_ddp_without_unused_parameter_search_survives_empty_batches(overrides, tmp_path):
    # fork: the workers inherit the imported modules instead of re-importing torch (seconds each)
    torch.multiprocessing.start_processes(
        _worker, args=(2, _free_port(), overrides, str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r.get("error") for r in results] == [None, None]
    assert [r["steps"] for r in results] == [len(STEPS)] * 2
