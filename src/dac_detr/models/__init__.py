"""The detector: backbones, deformable transformer with the DAC dual decoder, CDN queries."""

from .detector import DACDETR

__all__ = ["DACDETR"]
