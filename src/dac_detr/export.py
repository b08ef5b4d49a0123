"""Export a checkpoint for inference: `python -m dac_detr.export ckpt=PATH [format=pth|onnx] [out=FILE]`.

``format=pth`` (default) keeps only what inference needs: the detector's weights (EMA ones when the
run had EMA), with the DN label book dropped and the C-Decoder and denoising switched off in the
stored config (the C-Decoder has no weights of its own: it reuses the O-Decoder's layers).
Optimizer, scheduler, criterion and loop state are left out. ``{"model": state_dict, "dac_detr":
metadata}`` loads with ``dac_detr.evaluate`` and ``dac_detr.predict`` like a training checkpoint.

``format=onnx`` writes the O-Decoder inference graph as ONNX (docs/deploy.md): inputs ``images``
(B, 3, H, W) and ``pixel_mask`` (B, H, W) with dynamic B, H, W; outputs ``pred_logits`` and
``pred_boxes``, or with ``postprocess=topk|nms`` an extra input ``orig_sizes`` (B, 2) and the
outputs ``scores``, ``labels`` (category ids) and ``boxes`` (absolute xyxy). Class names, the
label -> category id map and the inference config are in the file's metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from .deploy.inference_model import inference_config, load_inference_model
from .utils.checkpoint_io import atomic_torch_save
from .utils.config_checks import ConfigError
from .utils.task import task_wrapper

__all__ = ["export_checkpoint", "export_onnx_checkpoint", "inference_config", "main"]

log = logging.getLogger("dac_detr")
FORMATS = ("pth", "onnx")


def export_checkpoint(ckpt: str | Path, out: Optional[str | Path] = None, use_ema: bool = True) -> Path:
    """Write the inference-only weights of ``ckpt`` (``format=pth``); returns their path."""
    loaded = load_inference_model(ckpt, use_ema)
    out_path = Path(out) if out else Path(ckpt).with_suffix(".export.pt")
    export = {
        "model": loaded.state,
        "dac_detr": {
            **{k: v for k, v in loaded.metadata.items() if k != "wandb_run_id"},
            "config": loaded.config,
            "exported_from": str(Path(ckpt).resolve()),
            "ema": loaded.ema,
            "dropped_keys": loaded.dropped_keys,
        },
    }
    atomic_torch_save(export, out_path)
    n_params = sum(v.numel() for v in loaded.state.values())
    log.info("Exported %d tensors (%.2f M values, EMA: %s) to %s; dropped %s", len(loaded.state), n_params / 1e6,
             loaded.ema, out_path, loaded.dropped_keys)
    print(f"Exported inference weights to {out_path} (EMA weights: {loaded.ema})", flush=True)
    return out_path


def postprocess_config(postprocess: Any, train_postprocess: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """``postprocess`` of the export command -> the PostProcess config to put in the graph, or None.

    ``none``/null: raw outputs. ``topk`` / ``nms``: that method with the training run's settings
    (num_select, nms_iou, pre_topk) where its method matches, else PostProcess's defaults. A dict
    (``{method: topk, num_select: 100}``) is taken as given.
    """
    if postprocess is None or str(postprocess).lower() in ("none", "null", "false", ""):
        return None
    base = dict(train_postprocess or {})
    if isinstance(postprocess, (dict, DictConfig)):
        chosen = OmegaConf.to_container(postprocess, resolve=True) if isinstance(postprocess, DictConfig) else dict(postprocess)
    elif str(postprocess) in ("topk", "nms"):
        chosen = {"method": str(postprocess)}
    else:
        raise ConfigError(f"postprocess={postprocess!r}: use none (raw logits/boxes), topk or nms.")
    method = chosen.get("method", base.get("method", "nms"))
    merged = {k: v for k, v in base.items() if k != "_target_"} if base.get("method") == method else {}
    merged.update(chosen)
    merged["method"] = method
    if method == "topk":
        merged = {k: v for k, v in merged.items() if k in ("method", "num_select")}
    return {"_target_": "dac_detr.evaluation.PostProcess", **merged}


def export_onnx_checkpoint(ckpt: str | Path, out: Optional[str | Path] = None, use_ema: bool = True,
                           postprocess: Any = None, opset: Optional[int] = None, optimize: bool = False) -> Path:
    """Write the ONNX inference graph of ``ckpt`` (``format=onnx``); returns its path."""
    from hydra.utils import instantiate

    from .deploy.graph import InferenceGraph
    from .deploy.onnx_export import OPSET, export_onnx, graph_metadata, require_onnx_export

    require_onnx_export()  # before the (slow) model build: a missing package is a one-line error
    loaded = load_inference_model(ckpt, use_ema)
    pp_cfg = postprocess_config(postprocess, loaded.config.get("postprocess"))
    pp = instantiate(pp_cfg) if pp_cfg else None
    graph = InferenceGraph(loaded.model, pp, loaded.category_ids)
    out_path = Path(out) if out else Path(ckpt).with_suffix(".onnx")
    metadata = graph_metadata(loaded.class_names, loaded.category_ids, loaded.config, pp_cfg,
                              ema=loaded.ema, exported_from=str(Path(ckpt).resolve()))
    export_onnx(graph, out_path, metadata=metadata, opset=int(opset or OPSET), optimize=optimize)
    print(f"Exported the ONNX graph to {out_path} (EMA weights: {loaded.ema}; outputs: "
          f"{', '.join(graph.output_names)}; post-processing: {pp_cfg['method'] if pp_cfg else 'none'})", flush=True)
    return out_path


@task_wrapper
def export(cfg: DictConfig) -> Path:
    """The export command: ``format=pth`` weights or ``format=onnx`` graph."""
    fmt = str(cfg.get("format") or "pth").lower()
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} is not an export format; use format=pth (weights) or format=onnx.")
    if fmt == "onnx":
        return export_onnx_checkpoint(cfg.ckpt, cfg.get("out"), bool(cfg.use_ema), cfg.get("postprocess"),
                                      cfg.get("opset"), bool(cfg.get("optimize", False)))
    return export_checkpoint(cfg.ckpt, cfg.get("out"), bool(cfg.use_ema))


@hydra.main(version_base="1.3", config_path="pkg://dac_detr.conf", config_name="export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()
