"""Detections drawn on an image, readable at any image size."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def class_colour(label: int) -> tuple[int, int, int]:
    """A fixed, saturated colour per class index (golden-ratio hue steps: neighbours differ)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()


def draw_detections(image: Tensor, boxes: Tensor, labels: Sequence[int], names: Sequence[str],
                    scores: Sequence[float]) -> np.ndarray:
    """uint8 (3, H, W) RGB + boxes (K, 4) absolute xyxy -> (H, W, 3) uint8 with the boxes drawn.

    One colour per class; the line width (about 0.3 % of the image diagonal, at least 1 px) and
    the font (about 2.5 % of the shorter side, at least 10 px) scale with the image; each box's
    "name score" label sits on a filled background in the class colour, inside the image.
    """
    from PIL import Image, ImageDraw

    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().cpu().numpy())
    draw = ImageDraw.Draw(pil)
    h, w = pil.height, pil.width
    line = max(1, round(0.003 * (h * h + w * w) ** 0.5))
    font = _font(max(10, round(0.025 * min(h, w))))
    for box, label, name, score in zip(torch.as_tensor(boxes).tolist(), labels, names, scores):
        colour = class_colour(int(label))
        x0, y0, x1, y1 = (float(v) for v in box)
        x0, x1 = sorted((max(0.0, min(w - 1.0, x0)), max(0.0, min(w - 1.0, x1))))
        y0, y1 = sorted((max(0.0, min(h - 1.0, y0)), max(0.0, min(h - 1.0, y1))))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        text = f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * line, bottom - top + 2 * line
        tx = min(max(0.0, x0), max(0.0, w - tw))
        ty = y0 - th if y0 - th >= 0 else min(y0, max(0.0, h - th))  # above the box, else inside it
        draw.rectangle((tx, ty, tx + tw, ty + th), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        draw.text((tx + line - left, ty + line - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    return np.asarray(pil)


def save_drawing(array: np.ndarray, path: Path) -> None:
    """Write (H, W, 3) uint8 as JPEG (quality 95) for .jpg/.jpeg paths, PNG otherwise."""
    from PIL import Image

    image = Image.fromarray(array)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)
