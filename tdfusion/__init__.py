"""tdfusion: task-driven multi-modal image fusion with a learnable fusion loss.

The three public entry points::

    from tdfusion import LearnableFusionLoss, LossGenerator, MetaFusionTrainer

Sub-packages: :mod:`tdfusion.losses` (the fusion loss), :mod:`tdfusion.nets` (the fusion
network and the loss generator), :mod:`tdfusion.trainer` (meta-learning), :mod:`tdfusion.tasks`
(segmentation and detection adapters), :mod:`tdfusion.data`, :mod:`tdfusion.metrics` and
:mod:`tdfusion.cli`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["LearnableFusionLoss", "LossGenerator", "MetaFusionTrainer", "__version__"]

# The public names are imported on first use so that ``import tdfusion`` (and the command line)
# stays fast; the objects are the same as in their sub-packages.
_LAZY = {
    "LearnableFusionLoss": "tdfusion.losses",
    "LossGenerator": "tdfusion.nets",
    "MetaFusionTrainer": "tdfusion.trainer",
}

if TYPE_CHECKING:  # pragma: no cover
    from tdfusion.losses import LearnableFusionLoss
    from tdfusion.nets import LossGenerator
    from tdfusion.trainer import MetaFusionTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tdfusion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
