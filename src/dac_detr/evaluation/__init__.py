"""Evaluation: post-processing, COCO metrics and the queries-per-object analysis."""

from .coco_evaluator import CocoEvaluator, format_coco_table
from .postprocess import PostProcess
from .queries_per_object import QueriesPerObject

__all__ = ["CocoEvaluator", "PostProcess", "QueriesPerObject", "format_coco_table"]
