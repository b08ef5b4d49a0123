"""dac-detr: DAC-DETR (Divide the Attention Layers and Conquer, NeurIPS 2023) for Lightning + Hydra."""

__version__ = "0.1.0"
