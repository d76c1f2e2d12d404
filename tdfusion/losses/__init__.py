"""Fusion losses: the learnable fusion loss, its terms, and the gradient operators it uses."""

from tdfusion.losses.fusion import (
    FusionLossTerms,
    LearnableFusionLoss,
    gradient_loss,
    intensity_loss,
    learnable_fusion_loss,
    learnable_fusion_loss_terms,
)
from tdfusion.losses.gradients import max_abs, max_abs_gradient, sobel

__all__ = [
    "FusionLossTerms",
    "LearnableFusionLoss",
    "gradient_loss",
    "intensity_loss",
    "learnable_fusion_loss",
    "learnable_fusion_loss_terms",
    "max_abs",
    "max_abs_gradient",
    "sobel",
]
