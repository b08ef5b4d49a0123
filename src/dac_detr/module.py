"""`DACDETRModule`: the LightningModule that trains and validates a DAC-DETR detector.

It owns no architecture decisions: Hydra builds the detector, the criterion, the post-processor
and the optimizer/scheduler factories, and passes them in. The module adds what the training
loop needs on top:

* a seeded ``torch.Generator`` per micro-batch (``step_seed``: optimizer step, micro-batch of a
  gradient accumulation, rank) for the CDN noise and the one-to-many positive subsampling, so a
  seeded run repeats exactly and a resumed run continues exactly;
* every loss term logged under ``train/`` (plus the sums per stream), every ``stat_*`` diagnostic;
* the official AdamW parameter groups (backbone, ``sampling_offsets``/``reference_points``, rest);
* COCO evaluation of the O-Decoder's last layer (``val/mAP`` is the monitored metric), the
  queries-per-object analysis, the COCO table printed at the end of each validation, and a few
  validation images with predicted and true boxes on W&B.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Callable, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 (also imported from here)
from .evaluation.coco_evaluator import format_coco_table

log = logging.getLogger("dac_detr")

# Loss-term prefixes of docs/interfaces.md, summed per stream for the dashboard.
LOSS_STREAMS = ("loss_o2o_", "loss_o2m_", "loss_dn_o_", "loss_dn_c_", "loss_enc_")
# The metrics of CocoEvaluator.compute() logged under val/.
COCO_METRICS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l", "AR_1", "AR_10", "AR_100")


class DACDETRModule(L.LightningModule):
    """Training and validation of a DAC-DETR detector.

    Args:
        model: the detector (``DACDETR``): ``model(images, pixel_mask, targets=None, generator=None)``.
        criterion: ``criterion(outputs, targets, generator=None) -> {loss_*: weighted, stat_*: detached}``.
        postprocess: ``postprocess(pred_logits, pred_boxes, orig_sizes) -> [{scores, labels, boxes}]``.
        optimizer: a factory ``optimizer(params) -> torch.optim.Optimizer`` (Hydra ``_partial_``),
            its ``lr``/``weight_decay`` are the base values of every group.
        scheduler: a factory ``scheduler(optimizer) -> LRScheduler`` stepped once per epoch, or None.
        lr_backbone: learning rate of the parameters whose names contain one of ``backbone_param_names``.
        lr_linear_proj_mult: learning-rate multiplier of the parameters whose names contain one of
            ``linear_proj_param_names`` (official 0.1: the deformable attention's sampling offsets).
        compile: ``torch.compile`` the detector in place (state-dict names stay the same): ``True``
            for Inductor, or the name of another backend (``aot_eager``, ``eager``, ``cudagraphs``).
        seed: base seed of the per-step generators.
        queries_per_object: a ``QueriesPerObject`` accumulator (thresholds 0.6/0.7/0.8), or None.
        eval_backend: ``pycocotools`` or ``faster_coco_eval`` for ``CocoEvaluator``.
        num_log_images: validation images with boxes logged to W&B at each validation (0 = none).
        log_score_threshold: predictions drawn on those images score at least this.
        print_table: print the COCO table at the end of each validation (rank 0).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        postprocess: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Optional[Callable[..., Any]] = None,
        lr_backbone: float = 2e-5,
        lr_linear_proj_mult: float = 0.1,
        backbone_param_names: Sequence[str] = ("backbone.",),
        linear_proj_param_names: Sequence[str] = ("sampling_offsets", "reference_points"),
        compile: bool | str = False,
        seed: int = 42,
        queries_per_object: Optional[nn.Module] = None,
        eval_backend: str = "pycocotools",
        num_log_images: int = 8,
        log_score_threshold: float = 0.3,
        print_table: bool = True,
    ) -> None:
        super().__init__()
        if eval_backend not in ("pycocotools", "faster_coco_eval"):
            raise ValueError(f"module.eval_backend must be 'pycocotools' or 'faster_coco_eval', got {eval_backend!r}.")
        self.model = model
        self.criterion = criterion
        self.postprocess = postprocess
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr_backbone = lr_backbone
        self.lr_linear_proj_mult = lr_linear_proj_mult
        self.backbone_param_names = tuple(backbone_param_names)
        self.linear_proj_param_names = tuple(linear_proj_param_names)
        self.compile = compile
        self.seed = int(seed)
        self.queries_per_object = queries_per_object
        self.eval_backend = eval_backend
        self.num_log_images = int(num_log_images)
        self.log_score_threshold = float(log_score_threshold)
        self.print_table = print_table
        # Set by the training script: stored in every checkpoint so evaluate/predict/export can
        # rebuild the detector (resolved Hydra config, class names, label -> category id).
        self.run_metadata: dict[str, Any] = {}
        self.evaluator = None
        self.last_val_metrics: dict[str, Any] = {}
        self._val_images: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        if self.compile and stage == "fit":
            # nn.Module.compile keeps the parameter names (no `_orig_mod.` prefix in checkpoints).
            # `compile: true` uses Inductor; a string names another torch.compile backend
            # (e.g. `aot_eager` to debug a compile problem without code generation).
            backend = "inductor" if self.compile is True else str(self.compile)
            self.model.compile(dynamic=True, backend=backend)

    def forward(self, images: Tensor, pixel_mask: Tensor) -> dict[str, Any]:
        """Inference outputs of the detector (O-Decoder only)."""
        return self.model(images, pixel_mask)

    # ------------------------------------------------------------------ reproducible randomness
    def step_seed(self, batch_idx: int) -> int:
        """The seed of one micro-batch: unique per (optimizer step, micro-batch, rank).

        ``seed + (global_step * A + batch_idx % A) * world_size + rank`` with A =
        ``accumulate_grad_batches``: the micro-batches accumulated into one optimizer step (which
        share ``global_step``) get seeds of their own, and with A = 1 it is ``seed + global_step *
        world_size + rank``. Everything in it is restored on resume, so a resumed run draws the same.
        """
        accumulate = int(self.trainer.accumulate_grad_batches)
        micro_step = self.global_step * accumulate + batch_idx % accumulate
        return self.seed + micro_step * self.trainer.world_size + self.global_rank

    def step_generator(self, device: torch.device, batch_idx: int = 0) -> torch.Generator:
        """A generator seeded by ``step_seed(batch_idx)``: drives CDN noise and o2m subsampling."""
        step_seed = self.step_seed(batch_idx)
        generator = torch.Generator(device=device)
        generator.manual_seed(step_seed)
        return generator

    # ------------------------------------------------------------------ training
    def training_step(self, batch: tuple[Tensor, Tensor, list[dict[str, Tensor]]], batch_idx: int) -> Tensor:
        images, pixel_mask, targets = batch
        generator = self.step_generator(images.device, batch_idx)
        outputs = self.model(images, pixel_mask, targets=targets, generator=generator)
        terms = self.criterion(outputs, targets, generator=generator)
        losses = {k: v for k, v in terms.items() if k.startswith("loss_")}
        if not losses:
            raise RuntimeError(
                f"The criterion returned no `loss_*` terms (keys: {sorted(terms)}); check the loss config."
            )
        loss = torch.stack([v for v in losses.values()]).sum()
        if not torch.isfinite(loss):
            bad = sorted(k for k, v in losses.items() if not torch.isfinite(v))
            raise FloatingPointError(
                f"Non-finite training loss at step {self.global_step}: {bad}. Lower the learning rate, "
                "check the data (degenerate boxes), or use precision=32."
            )

        batch_size = images.shape[0]
        logged = {f"train/{k}": v.detach() for k, v in terms.items()}
        for prefix in LOSS_STREAMS:
            parts = [v.detach() for k, v in losses.items() if k.startswith(prefix)]
            if parts:
                logged[f"train/{prefix.rstrip('_')}"] = torch.stack(parts).sum()
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=batch_size)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW groups of the official recipe (docs/method.md, Training recipe), chosen by
        substring of the parameter name."""
        base_lr = self.optimizer_factory.keywords.get("lr") if hasattr(self.optimizer_factory, "keywords") else None
        if base_lr is None:
            raise ValueError("optimizer.lr must be set (the learning rate of the non-backbone parameters).")
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "linear_proj": [], "rest": []}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if any(key in name for key in self.backbone_param_names):
                groups["backbone"].append(param)
            elif any(key in name for key in self.linear_proj_param_names):
                groups["linear_proj"].append(param)
            else:
                groups["rest"].append(param)
        lrs = {"backbone": self.lr_backbone, "linear_proj": base_lr * self.lr_linear_proj_mult, "rest": base_lr}
        param_groups = [
            {"params": params, "lr": lrs[name], "name": name} for name, params in groups.items() if params
        ]
        optimizer = self._optimizer_factory_for_precision()(params=param_groups)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "frequency": 1}}

    def _optimizer_factory_for_precision(self) -> Callable[..., torch.optim.Optimizer]:
        """The optimizer factory, without ``fused=True`` where Lightning refuses it.

        A fused optimizer unscales gradients itself, so Lightning will not clip gradients for it
        under ``*-mixed`` precision (it raises at the first step). The quickstart asks for the fused
        AdamW for speed; with ``trainer.precision=bf16-mixed`` it falls back to the unfused one (the
        same update) with a warning rather than failing.
        """
        factory = self.optimizer_factory
        keywords = getattr(factory, "keywords", {})
        trainer = self._trainer  # None outside a Trainer (scripts/profile_step.py): keep the config as is
        if not keywords.get("fused") or trainer is None:
            return factory
        if not str(trainer.precision).endswith("-mixed") or not trainer.gradient_clip_val:
            return factory
        log.warning(
            "optimizer.fused=true cannot run with trainer.precision=%s and gradient clipping (Lightning does "
            "not clip for a fused optimizer under mixed precision): using the unfused AdamW. Set "
            "optimizer.fused=false to silence this.", trainer.precision,
        )
        return functools.partial(factory.func, *factory.args, **{**keywords, "fused": False})

    # ------------------------------------------------------------------ validation
    def _datamodule(self):
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "coco_gt"):
            raise RuntimeError(
                "COCO evaluation needs the data module (its coco_gt and label mapping): call "
                "trainer.fit/validate(module, datamodule=...) instead of passing bare dataloaders."
            )
        return datamodule

    def on_validation_epoch_start(self) -> None:
        from .evaluation import CocoEvaluator

        datamodule = self._datamodule()
        self.evaluator = CocoEvaluator(datamodule.coco_gt("val"), datamodule.label_to_category_id, backend=self.eval_backend)
        if self.queries_per_object is not None:
            self.queries_per_object.reset()
        self._val_images = []

    def validation_step(self, batch: tuple[Tensor, Tensor, list[dict[str, Tensor]]], batch_idx: int) -> None:
        images, pixel_mask, targets = batch
        outputs = self.model(images, pixel_mask)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(images.device)
        detections = self.postprocess(outputs["pred_logits"], outputs["pred_boxes"], orig_sizes)
        self.evaluator.update([int(t["image_id"]) for t in targets], detections)
        if self.queries_per_object is not None:
            self.queries_per_object.update(outputs["pred_logits"], outputs["pred_boxes"], targets)
        if self.trainer.is_global_zero and len(self._val_images) < self.num_log_images and self._wandb_logger() is not None:
            self._keep_images_for_wandb(images, pixel_mask, targets, detections)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            # A two-batch sanity pass gives meaningless COCO numbers; only check that it runs.
            self.evaluator.compute()
            return
        metrics = self.evaluator.compute()
        logged = {f"val/{k}": float(metrics[k]) for k in COCO_METRICS if k in metrics}
        per_class = metrics.get("per_class", {}) or {}
        for name, ap in per_class.items():
            logged[f"val/AP/{name}"] = float(ap)
        qpo = self.queries_per_object.compute() if self.queries_per_object is not None else {}
        for threshold, value in qpo.items():
            logged[f"val/queries_per_object@{float(threshold):.1f}"] = float(value)
        # Values are identical on every rank (the evaluator gathers once); sync_dist only averages equals.
        self.log_dict(logged, sync_dist=True)
        self.last_val_metrics = {**metrics, "queries_per_object": qpo}
        if self.trainer.is_global_zero:
            if self.print_table:
                fitting = self.trainer.state.fn == "fit"
                title = f"COCO bbox evaluation (epoch {self.current_epoch})" if fitting else "COCO bbox evaluation"
                print("\n" + format_coco_table(metrics, qpo, title=title, summary=self.evaluator.summary), flush=True)
            self._log_wandb_media(per_class)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        metadata = dict(self.run_metadata)
        wandb_logger = self._wandb_logger()
        if wandb_logger is not None:
            # Stored so that `ckpt_path=last` continues the same W&B run.
            metadata["wandb_run_id"] = wandb_logger.version
        checkpoint["dac_detr"] = metadata

    # ------------------------------------------------------------------ W&B media
    def _wandb_logger(self):
        from lightning.pytorch.loggers import WandbLogger

        if self._trainer is None:
            return None
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                return logger
        return None

    def _keep_images_for_wandb(self, images: Tensor, pixel_mask: Tensor, targets: list[dict], detections: list[dict]) -> None:
        mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device).view(3, 1, 1)
        for image, target, det in zip(images, targets, detections):
            if len(self._val_images) >= self.num_log_images:
                break
            h, w = (int(v) for v in target["size"])
            pixels = ((image[:, :h, :w].float() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
            orig_h, orig_w = (float(v) for v in target["orig_size"])
            keep = det["scores"] >= self.log_score_threshold
            pred_rel = (det["boxes"][keep].float() / torch.tensor([orig_w, orig_h, orig_w, orig_h], device=det["boxes"].device)).cpu()
            gt = target["boxes"].float().cpu()  # normalised cxcywh
            gt_rel = torch.cat([gt[:, :2] - gt[:, 2:] / 2, gt[:, :2] + gt[:, 2:] / 2], dim=-1)
            self._val_images.append(
                {
                    "pixels": pixels,
                    "pred": (pred_rel.clamp(0, 1).tolist(), det["labels"][keep].tolist(), det["scores"][keep].tolist()),
                    "gt": (gt_rel.clamp(0, 1).tolist(), target["labels"].tolist()),
                }
            )

    def _log_wandb_media(self, per_class: dict[str, float]) -> None:
        wandb_logger = self._wandb_logger()
        if wandb_logger is None:
            return
        import wandb

        class_names = list(self.run_metadata.get("class_names") or [])
        class_labels = {i: name for i, name in enumerate(class_names)}

        def box(xyxy: list[float], label: int, score: Optional[float] = None) -> dict[str, Any]:
            name = class_labels.get(label, str(label))
            entry = {
                "position": {"minX": xyxy[0], "minY": xyxy[1], "maxX": xyxy[2], "maxY": xyxy[3]},
                "class_id": int(label),
                "box_caption": name if score is None else f"{name} {score:.2f}",
            }
            if score is not None:
                entry["scores"] = {"score": float(score)}
            return entry

        media = []
        for item in self._val_images:
            pred_boxes, pred_labels, pred_scores = item["pred"]
            gt_boxes, gt_labels = item["gt"]
            boxes = {
                "predictions": {
                    "box_data": [box(b, l, s) for b, l, s in zip(pred_boxes, pred_labels, pred_scores)],
                    "class_labels": class_labels,
                },
                "ground_truth": {"box_data": [box(b, l) for b, l in zip(gt_boxes, gt_labels)], "class_labels": class_labels},
            }
            media.append(wandb.Image(item["pixels"], boxes=boxes))
        payload: dict[str, Any] = {}
        if media:
            payload["val/examples"] = media
        if per_class:
            payload["val/per_class_AP"] = wandb.Table(
                columns=["class", "AP"],
                data=[[name, None if (ap is None or math.isnan(ap)) else float(ap)] for name, ap in per_class.items()],
            )
        if payload:
            wandb_logger.log_metrics(payload, step=self.global_step)
        self._val_images = []

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            rank_zero_info(f"DAC-DETR: {trainable / 1e6:.2f} M trainable parameters")
