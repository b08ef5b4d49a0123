"""The same training data order whether or not a run was interrupted and resumed.

A plain ``DataLoader(shuffle=True)`` draws its permutation from the global RNG, whose state after
a resume differs from the uninterrupted run. Under DDP, Lightning's ``DistributedSampler`` already
derives the order from (seed, epoch). For one process, ``EpochSeededRandomSampler`` does the same:
Lightning calls ``set_epoch`` before every epoch (also the resumed one), and the permutation comes
from (seed, epoch). With ``num_workers=0`` the augmentations run in this process, so the global
RNGs are reseeded from (seed, epoch) too, which makes a resumed run bit-identical.
(With worker processes the order is the same, the workers' augmentation draws are not.)
"""

from __future__ import annotations

import random
from typing import Iterator, Sized

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler


class EpochSeededRandomSampler(Sampler[int]):
    """A random permutation per epoch, a function of (seed, epoch) only."""

    def __init__(self, data_source: Sized, seed: int = 42, reseed_global_rng: bool = True) -> None:
        self.data_source = data_source
        self.seed = int(seed)
        self.reseed_global_rng = reseed_global_rng
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.data_source)

    def __iter__(self) -> Iterator[int]:
        epoch_seed = (self.seed * 1_000_003 + self.epoch) % (2**63)
        generator = torch.Generator().manual_seed(epoch_seed)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        if self.reseed_global_rng:
            # Runs at the epoch's first batch, after every other draw of the loop's start-up.
            random.seed(epoch_seed)
            np.random.seed(epoch_seed % (2**32))
            torch.manual_seed(epoch_seed)
        return iter(order)


def with_epoch_seeded_order(loader: DataLoader, seed: int) -> DataLoader:
    """The same loader with its ``RandomSampler`` replaced by ``EpochSeededRandomSampler``."""
    if not isinstance(loader, DataLoader) or not isinstance(loader.sampler, RandomSampler):
        return loader  # a custom sampler or iterable: leave its order alone
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=EpochSeededRandomSampler(loader.dataset, seed, reseed_global_rng=loader.num_workers == 0),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )


class EpochSeededTrainLoader:
    """Replaces ``datamodule.train_dataloader`` (picklable, so ``ddp_spawn`` can ship it)."""

    def __init__(self, datamodule, seed: int) -> None:
        self.datamodule = datamodule
        self.seed = int(seed)

    def __call__(self) -> DataLoader:
        return with_epoch_seeded_order(type(self.datamodule).train_dataloader(self.datamodule), self.seed)


def make_train_order_reproducible(datamodule, seed: int) -> None:
    """Single-process runs: the training order becomes a function of (seed, epoch)."""
    datamodule.train_dataloader = EpochSeededTrainLoader(datamodule, seed)
