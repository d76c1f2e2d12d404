"""The demo: learned against fixed fusion loss on the bundled sample, scored on held-out pairs.

:func:`run_demo` fine-tunes the bundled pretrained fusion network twice with the same seed and
budget, once under the learned loss (a :class:`~tdfusion.LossGenerator` trained by meta steps)
and once under the fixed loss ``w_a = w_b = 1/2``, each with a YOLOv8-n detector trained from
scratch; it scores both on sample pairs they did not train on (cross-validation) and draws the
pictures. ``tdfusion demo`` is a thin layer over it.

Example
-------
>>> from tdfusion.demo import DemoSettings
>>> DemoSettings().replace(epochs=2).epochs
2
"""

from __future__ import annotations

from tdfusion.demo.arm import ArmRun, WeightTracker, fold_split, run_arm
from tdfusion.demo.comparison import compare_arms
from tdfusion.demo.protocol import run_demo
from tdfusion.demo.settings import ARMS, PRETRAINED, DemoSettings

__all__ = [
    "ARMS",
    "PRETRAINED",
    "ArmRun",
    "DemoSettings",
    "WeightTracker",
    "compare_arms",
    "fold_split",
    "run_arm",
    "run_demo",
]
