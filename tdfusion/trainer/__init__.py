"""The meta-learning trainer: functional meta step, training loop, callbacks and checkpoints."""

from tdfusion.trainer.callbacks import (
    CSV_FIELDS,
    Callback,
    CSVLogger,
    LambdaCallback,
    TensorBoardLogger,
)
from tdfusion.trainer.checkpoint import atomic_save, load_checkpoint
from tdfusion.trainer.meta import (
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
    "TensorBoardLogger",
    "atomic_save",
    "differentiable_step",
    "load_checkpoint",
    "make_inner_optimizer",
    "trainable_parameters",
    "vector_jacobian_product",
]
