"""The meta-learning trainer: the algorithm, its hypergradients, the training loop, checkpoints.

Modules: :mod:`~tdfusion.trainer.trainer` (the algorithm), :mod:`~tdfusion.trainer.meta`
(functional steps), :mod:`~tdfusion.trainer.hypergradient`, :mod:`~tdfusion.trainer.batches`,
:mod:`~tdfusion.trainer.loop`, :mod:`~tdfusion.trainer.checkpoint`,
:mod:`~tdfusion.trainer.callbacks` and :mod:`~tdfusion.trainer.options`.
"""

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
