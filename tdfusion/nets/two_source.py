"""The part ReFusionNet and LossGenerator share: one embedding and Restormer encoder per source."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tdfusion.nets.checkpointing import checkpointed_call, checkpointing_applies
from tdfusion.nets.layers import (
    check_source_pair,
    restormer_stage,
    to_channels_last,
    validate_widths,
)
from tdfusion.nets.pretrained import PretrainedMixin

__all__ = ["TwoSourceNetwork"]


class TwoSourceNetwork(PretrainedMixin, nn.Module):
    """Base of the two-source networks: per source a 3x3 embedding and Restormer blocks.

    Subclasses add what follows the two encoders (fusion, decoder, head) and set ``arch``,
    ``trainer_role``, ``in_channels`` and ``out_channels``.

    Parameters
    ----------
    dim : int
        Feature channels per source.
    num_blocks : int
        Restormer blocks per encoder (and per later stage).
    num_heads : int
        Attention heads; ``dim`` must be a multiple of it.
    ffn_expansion : float
        Feed-forward width factor.
    bias : bool
        Whether the convolutions have biases.

    Attributes
    ----------
    grad_checkpointing : bool
        Whether the Restormer blocks (and ReFusionNet's fusion block) are checkpointed while a
        graph is recorded; see :meth:`set_grad_checkpointing`. False by default.
    """

    grad_checkpointing: bool = False

    def __init__(
        self,
        dim: int = 16,
        num_blocks: int = 2,
        num_heads: int = 8,
        ffn_expansion: float = 2.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        validate_widths(dim, num_blocks, num_heads, ffn_expansion)
        self._config: dict[str, Any] = {
            "dim": dim,
            "num_blocks": num_blocks,
            "num_heads": num_heads,
            "ffn_expansion": float(ffn_expansion),
            "bias": bool(bias),
        }
        self.embed_a = nn.Conv2d(1, dim, kernel_size=3, padding=1, bias=bias)
        self.embed_b = nn.Conv2d(1, dim, kernel_size=3, padding=1, bias=bias)
        self.encoder_a = restormer_stage(dim, num_blocks, num_heads, ffn_expansion, bias)
        self.encoder_b = restormer_stage(dim, num_blocks, num_heads, ffn_expansion, bias)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this architecture (a copy)."""
        return dict(self._config)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every block: keep its input only, run its forward again in the backward.

        The activations kept for the backward pass shrink to the blocks' inputs (a default
        ReFusionNet's graph keeps 5% of the elements it keeps without, a LossGenerator's 6%)
        at the price of one more forward of the blocks per backward pass; outputs and
        gradients are unchanged. It applies while a graph is recorded (not under
        :func:`torch.no_grad` or :func:`torch.inference_mode`), including under
        :func:`torch.func.functional_call`, so the meta step's ``F'`` and second-order
        back-propagation through the inner step work as without it. The name and signature
        are timm's.

        Parameters
        ----------
        enable : bool
            Turn checkpointing on (True) or off.

        Example
        -------
        >>> from tdfusion.nets import ReFusionNet
        >>> net = ReFusionNet()
        >>> net.set_grad_checkpointing()
        >>> net(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)).requires_grad
        True
        """
        self.grad_checkpointing = bool(enable)

    def _checkpoints(self) -> bool:
        return self.grad_checkpointing and checkpointing_applies()

    def call_block(self, block: nn.Module, *inputs: torch.Tensor) -> Any:
        """``block(*inputs)``, checkpointed when ``grad_checkpointing`` applies.

        Parameters
        ----------
        block : torch.nn.Module
            One block of this network.
        *inputs : torch.Tensor
            Its positional arguments.

        Returns
        -------
        Any
            What ``block(*inputs)`` returns.
        """
        if self._checkpoints():
            return checkpointed_call(block, *inputs)
        return block(*inputs)

    def run_blocks(self, blocks: nn.Sequential, features: torch.Tensor) -> torch.Tensor:
        """Run a stage of blocks, each checkpointed when ``grad_checkpointing`` applies.

        Parameters
        ----------
        blocks : torch.nn.Sequential
            Blocks of one input and one output.
        features : torch.Tensor
            The stage's input.

        Returns
        -------
        torch.Tensor
            Its output.
        """
        if not self._checkpoints():
            return blocks(features)  # the stage's own call (and hooks), as without the option
        for block in blocks:
            features = checkpointed_call(block, features)
        return features

    def encode(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Check the sources and encode each (channels-last features, ``dim`` channels).

        Parameters
        ----------
        a, b : torch.Tensor
            The sources, (N, 1, H, W), floating point.

        Returns
        -------
        tuple of torch.Tensor
            The features of ``a`` and of ``b``, each (N, dim, H, W).

        Raises
        ------
        ValueError
            When the shapes or dtypes do not fit (outside autocast the sources must have
            the parameters' dtype).
        """
        check_source_pair(a, b, type(self).__name__, self.embed_a.weight.dtype)
        features_a = self.run_blocks(self.encoder_a, self.embed_a(to_channels_last(a)))
        features_b = self.run_blocks(self.encoder_b, self.embed_b(to_channels_last(b)))
        return features_a, features_b
