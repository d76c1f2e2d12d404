"""Downstream task networks (the paper's T) and their scores.

``SegmentationTask`` (SegFormer, extra ``seg``) and ``DetectionTask`` (YOLOv8, extra ``det``) are
:class:`torch.nn.Module` s whose ``forward(fused, target)`` returns the task loss and whose
``predict(fused)`` returns label maps or detections. The optional libraries are imported only
when a task or score is built, so importing this package needs neither.
"""

from __future__ import annotations

from tdfusion.tasks.base import TaskAdapter
from tdfusion.tasks.detection import Detections, DetectionTask
from tdfusion.tasks.scores import DetectionScore, SegmentationScore
from tdfusion.tasks.segmentation import SegmentationTask

__all__ = [
    "DetectionScore",
    "DetectionTask",
    "Detections",
    "SegmentationScore",
    "SegmentationTask",
    "TaskAdapter",
]
