"""The criterion on a real (tiny) DACDETR's outputs: the contract holds end to end, and every
trainable parameter gets a finite gradient (what DDP needs), also for a batch without objects."""

from __future__ import annotations

import pytest
import torch

from dac_detr.losses import HungarianMatcher, OneToManyAssigner, SetCriterion
from dac_detr.models import DACDETR
from tiny_backbone import TinyBackbone

NUM_CLASSES = 5


def _model(dac: bool) -> DACDETR:
    torch.manual_seed(0)
    model = DACDETR(TinyBackbone(channels=(8, 16, 16)), num_classes=NUM_CLASSES, hidden_dim=32, nheads=4, num_encoder_layers=1,
                    num_decoder_layers=2, dim_feedforward=32, num_feature_levels=4, enc_n_points=2,
                    dec_n_points=2, num_queries=10, dn_number=4, dac_enabled=dac)
    with torch.no_grad():  # the official init zeroes the last box layer; perturb it so boxes vary
        for head in list(model.bbox_embed) + list(model.class_embed):
            for p in head.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.train()


def _batch(gt_counts):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(len(gt_counts), 3, 64, 64, generator=g)
    mask = torch.zeros(len(gt_counts), 64, 64, dtype=torch.bool)
    mask[1:, :, 48:] = True
    targets = [{"labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                "boxes": torch.cat([0.3 + 0.4 * torch.rand(n, 2, generator=g), 0.1 + 0.3 * torch.rand(n, 2, generator=g)],
                                   1)} for n in gt_counts]
    return images, mask, targets


@pytest.mark.parametrize("dac, gt_counts", [(True, (3, 1)), (True, (0, 0)), (False, (2, 0))])
def test_every_parameter_gets_a_gradient(dac, gt_counts):
    model = _model(dac)
    images, mask, targets = _batch(gt_counts)
    gen = torch.Generator().manual_seed(0)
    outputs = model(images, mask, targets=targets, generator=gen)
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(), OneToManyAssigner() if dac else None)
    terms = criterion(outputs, targets, generator=gen)
    has_gt = sum(gt_counts) > 0
    expected = {"o2o", "enc"} | ({"o2m"} if dac else set()) | ({"dn_o"} if has_gt else set()) \
        | ({"dn_c"} if has_gt and dac else set())
    found = {k[len("loss_"):].rsplit("_", 2)[0] if not k.startswith("loss_enc") else "enc"
             for k in terms if k.startswith("loss_")}
    assert found == expected
    assert sum(k.startswith("loss_") for k in terms) == 3 * 2 * (len(expected) - 1) + 3
    loss = torch.stack([v for k, v in terms.items() if k.startswith("loss_")]).sum()
    assert torch.isfinite(loss)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
