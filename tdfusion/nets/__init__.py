"""Networks: the fusion network F, the loss generator G, their blocks, registry and checkpoints.

Example
-------
>>> import torch
>>> from tdfusion.nets import LossGenerator, ReFusionNet, create_model
>>> a, b = torch.rand(1, 1, 32, 40), torch.rand(1, 1, 32, 40)
>>> ReFusionNet()(a, b).shape
torch.Size([1, 1, 32, 40])
>>> create_model("loss_generator")(a, b).shape
torch.Size([1, 2, 32, 40])
"""

from __future__ import annotations

from tdfusion.nets.bundled import DEFAULT_FUSION_WEIGHTS, list_pretrained
from tdfusion.nets.checkpointing import checkpointed_call
from tdfusion.nets.fixed_weights import FixedLossWeights
from tdfusion.nets.generator import LossGenerator
from tdfusion.nets.layers import (
    ChannelAttention,
    CrossAttentionFusion,
    GatedFeedForward,
    LayerNorm2d,
    RestormerBlock,
)
from tdfusion.nets.pretrained import (
    PretrainedMixin,
    convert_research_state_dict,
    load_pretrained,
)
from tdfusion.nets.refusion import ReFusionNet
from tdfusion.nets.registry import create_model, list_models, register_model
from tdfusion.nets.two_source import TwoSourceNetwork

__all__ = [
    "DEFAULT_FUSION_WEIGHTS",
    "ChannelAttention",
    "CrossAttentionFusion",
    "FixedLossWeights",
    "GatedFeedForward",
    "LayerNorm2d",
    "LossGenerator",
    "PretrainedMixin",
    "ReFusionNet",
    "RestormerBlock",
    "TwoSourceNetwork",
    "checkpointed_call",
    "convert_research_state_dict",
    "create_model",
    "list_models",
    "list_pretrained",
    "load_pretrained",
    "register_model",
]
