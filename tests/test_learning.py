"""The detector learns: the tiny quickstart detector overfits 15 synthetic images (96 steps).

Every other end-to-end test stops on a model that has not learned; this one asserts outcomes on
the shared ``learned_run`` (tests/conftest.py), so a detector that trains without learning, a
C-stream whose gradient is cut, or a box refinement that does nothing fails here. The thresholds
sit between what the working code reaches and what each breakage reaches (recorded below; a
seeded CPU run repeats them).
"""

from __future__ import annotations

import math

import torch

from test_train_helpers import LEARNING_IMAGES, compose_train

# Working code: the training loss falls from ~31.9 (first epoch) to ~17.2 (last epoch, x0.54) and
# the mAP on the 15 training images reaches ~0.51. With the C-Decoder's outputs detached the mAP
# still passes MIN_MAP, but no one-to-many gradient reaches the decoder layers any more (last
# test) and the last layer's boxes gain less on the proposals (0.757 vs 0.772); with the refinement
# deltas zeroed the loss and mAP barely change, but the O-Decoder's last-layer boxes are then no
# better than the encoder proposals they start from (0.681 vs 0.681).
LOSS_FALL = 0.65  # last-epoch mean training loss <= LOSS_FALL x the first-epoch mean
MIN_MAP = 0.35  # COCO mAP@[.5:.95] of the (EMA) weights on the images they were trained on
REFINE_GAIN = 0.97  # last decoder layer's GIoU loss <= REFINE_GAIN x the encoder proposals' GIoU loss


def test_training_loss_falls(learned_run):
    first, last = learned_run.epoch_mean("loss", 0), learned_run.epoch_mean("loss", -1)
    assert all(math.isfinite(s["train/loss"]) for s in learned_run.steps)
    assert last <= LOSS_FALL * first, f"training loss {first:.2f} -> {last:.2f}: fell less than x{LOSS_FALL}"


def test_map_on_the_training_images_rises(learned_run):
    metrics = learned_run.metrics
    print(f"learning run: {len(learned_run.steps)} steps in {learned_run.seconds:.0f} s, mAP {metrics['val/mAP']:.3f}")
    assert metrics["val/mAP"] >= MIN_MAP, f"mAP {metrics['val/mAP']:.3f} on the {LEARNING_IMAGES} training images"
    assert metrics["val/mAP_50"] > metrics["val/mAP"]


def test_box_refinement_improves_on_the_proposals(learned_run):
    """Two-stage + refinement: the decoder starts from the encoder's proposals and each layer
    predicts a correction; after training the last layer's boxes must beat the proposals."""
    last_layer = max(int(k.rsplit("_", 1)[1]) for k in learned_run.steps[-1] if k.startswith("train/loss_o2o_giou_"))
    decoder = learned_run.epoch_mean(f"loss_o2o_giou_{last_layer}", -1)
    proposals = learned_run.epoch_mean("loss_enc_giou", -1)
    assert decoder <= REFINE_GAIN * proposals, (
        f"last decoder layer GIoU loss {decoder:.4f} vs encoder proposals {proposals:.4f}: the refinement does not refine"
    )


def test_both_streams_were_trained(learned_run):
    """The C-stream (one-to-many) and the denoising groups of both streams are in the loss."""
    logged = learned_run.steps[-1]
    for stream in ("loss_o2o", "loss_o2m", "loss_dn_o", "loss_dn_c", "loss_enc"):
        assert f"train/{stream}" in logged, stream
    assert learned_run.epoch_mean("loss_o2m", -1) < learned_run.epoch_mean("loss_o2m", 0)


def test_the_one_to_many_loss_trains_the_shared_decoder(learned_run):
    """The C-stream's gradient: on the trained detector, the one-to-many loss alone reaches every
    decoder layer's cross-attention and FFN (the blocks the C-Decoder shares with the O-Decoder)
    and layer 0's self-attention (the C-stream starts from its output), and no self-attention of a
    later layer (the C-Decoder has none)."""
    from dac_detr.utils.checkpoint import detector_state_dict, load_detector_weights
    from dac_detr.utils.instantiate import build_datamodule, build_module

    cfg = compose_train(learned_run.overrides)
    datamodule = build_datamodule(cfg, "fit")
    module = build_module(cfg, datamodule.num_classes, training=True)
    load_detector_weights(module.model, detector_state_dict(torch.load(learned_run.ckpt, map_location="cpu",
                                                                        weights_only=False)))
    images, pixel_mask, targets = next(iter(datamodule.val_dataloader()))
    module.model.train()
    generator = torch.Generator().manual_seed(0)
    terms = module.criterion(module.model(images, pixel_mask, targets=targets, generator=generator), targets,
                             generator=generator)
    torch.stack([v for k, v in terms.items() if k.startswith("loss_o2m_")]).sum().backward()

    def grad_norm(prefix: str) -> float:
        grads = [p.grad.norm() for n, p in module.model.named_parameters() if n.startswith(prefix) and p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    layers = module.model.transformer.decoder.layers
    for lid in range(len(layers)):
        for block in ("cross_attn", "linear1", "linear2", "norm3"):
            assert grad_norm(f"transformer.decoder.layers.{lid}.{block}.") > 0, f"no o2m gradient in layer {lid} {block}"
    assert grad_norm("transformer.decoder.layers.0.self_attn.") > 0
    for lid in range(1, len(layers)):
        assert grad_norm(f"transformer.decoder.layers.{lid}.self_attn.") == 0.0
