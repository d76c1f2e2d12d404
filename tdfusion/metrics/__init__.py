"""Fusion quality metrics (EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM, PSNR), field conventions.

:func:`evaluate` scores one fused image against its two sources; each metric is also a
function of its own; :func:`evaluate_folders` scores folders of images, in parallel.
"""

from __future__ import annotations

from tdfusion.metrics.batch import evaluate_files, evaluate_folders, evaluate_many, summarise
from tdfusion.metrics.edge_preservation import qabf, sobel_strength_orientation
from tdfusion.metrics.evaluation import CONVENTIONS, METRIC_NAMES, evaluate
from tdfusion.metrics.information import mutual_information, mutual_information_pair
from tdfusion.metrics.similarity import psnr, scd, ssim
from tdfusion.metrics.statistics import (
    average_gradient,
    entropy,
    spatial_frequency,
    standard_deviation,
)
from tdfusion.metrics.visual_information import vif, vif_pair

__all__ = [
    "CONVENTIONS",
    "METRIC_NAMES",
    "average_gradient",
    "entropy",
    "evaluate",
    "evaluate_files",
    "evaluate_folders",
    "evaluate_many",
    "mutual_information",
    "mutual_information_pair",
    "psnr",
    "qabf",
    "scd",
    "sobel_strength_orientation",
    "spatial_frequency",
    "ssim",
    "standard_deviation",
    "summarise",
    "vif",
    "vif_pair",
]
