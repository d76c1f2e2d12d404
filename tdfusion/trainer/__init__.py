"""The meta-learning trainer: the algorithm, its hypergradients, the training loop, checkpoints.

Modules: ``trainer`` (the algorithm, :class:`MetaFusionTrainer`), :mod:`~tdfusion.trainer.meta`
(functional steps), :mod:`~tdfusion.trainer.hypergradient`, :mod:`~tdfusion.trainer.batches`,
:mod:`~tdfusion.trainer.loop`, :mod:`~tdfusion.trainer.streams` (the two phases' random
streams), :mod:`~tdfusion.trainer.checkpoint`,
``callbacks``, :mod:`~tdfusion.trainer.statistics`, :mod:`~tdfusion.trainer.options`,
:mod:`~tdfusion.trainer.precision` (mixed precision) and
:mod:`~tdfusion.trainer.compilation` (``torch.compile``, channels-last). The names below are
imported on first use, so that :mod:`tdfusion.nets` can read trainer checkpoints through
:mod:`tdfusion.trainer.checkpoint` without importing the trainer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "CSV_FIELDS",
    "Batch",
    "CSVLogger",
    "Callback",
    "LambdaCallback",
    "MetaFusionTrainer",
    "OptimizerStep",
    "TensorBoardLogger",
    "atomic_save",
    "differentiable_step",
    "load_checkpoint",
    "make_inner_optimizer",
    "trainable_parameters",
    "vector_jacobian_product",
]

_LAZY = {
    "CSV_FIELDS": "tdfusion.trainer.callbacks",
    "CSVLogger": "tdfusion.trainer.callbacks",
    "Callback": "tdfusion.trainer.callbacks",
    "LambdaCallback": "tdfusion.trainer.callbacks",
    "TensorBoardLogger": "tdfusion.trainer.callbacks",
    "atomic_save": "tdfusion.trainer.checkpoint",
    "load_checkpoint": "tdfusion.trainer.checkpoint",
    "OptimizerStep": "tdfusion.trainer.meta",
    "differentiable_step": "tdfusion.trainer.meta",
    "make_inner_optimizer": "tdfusion.trainer.meta",
    "trainable_parameters": "tdfusion.trainer.meta",
    "vector_jacobian_product": "tdfusion.trainer.meta",
    "Batch": "tdfusion.trainer.trainer",
    "MetaFusionTrainer": "tdfusion.trainer.trainer",
}

if TYPE_CHECKING:  # pragma: no cover
    from tdfusion.trainer.callbacks import (
        CSV_FIELDS,
        Callback,
        CSVLogger,
        LambdaCallback,
        TensorBoardLogger,
    )
    from tdfusion.trainer.checkpoint import atomic_save, load_checkpoint
    from tdfusion.trainer.meta import (
        OptimizerStep,
        differentiable_step,
        make_inner_optimizer,
        trainable_parameters,
        vector_jacobian_product,
    )
    from tdfusion.trainer.trainer import Batch, MetaFusionTrainer


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tdfusion.trainer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
