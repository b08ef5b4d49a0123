"""Helpers of the training application: instantiation, the task wrapper, W&B, checkpoints, EMA."""
