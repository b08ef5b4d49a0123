"""The detector: backbones, deformable transformer with the DAC dual decoder, CDN queries."""

from .backbone import ResNetBackbone, SwinBackbone
from .detector import DACDETR

__all__ = ["DACDETR", "ResNetBackbone", "SwinBackbone"]
