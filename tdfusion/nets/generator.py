"""The loss generator G: per-pixel weights ``(w_a, w_b)`` of the learnable fusion loss."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from tdfusion.nets.layers import (
    restormer_stage,
)
from tdfusion.nets.registry import register_model
from tdfusion.nets.two_source import TwoSourceNetwork

__all__ = ["LossGenerator"]


@register_model("loss_generator")
class LossGenerator(TwoSourceNetwork):
    """The loss generator G: two sources -> per-pixel loss weights that sum to one.

    Each source is embedded by a 3x3 convolution (1 -> ``dim``) and ``num_blocks`` Restormer
    blocks; the two are concatenated and go through ``num_blocks`` Restormer blocks at
    ``2 * dim``, a 3x3 convolution (``2 * dim -> dim``), PReLU (one slope, initially 0.25),
    a 3x3 convolution (``dim -> 2``) and a softmax over the channel axis, so that
    ``w_a + w_b = 1`` at every pixel (about 45k parameters with the defaults).

    Parameters
    ----------
    dim : int
        Feature channels per source.
    num_blocks : int
        Restormer blocks per encoder and after the concatenation.
    num_heads : int
        Attention heads; ``dim`` must be a multiple of it.
    ffn_expansion : float
        Feed-forward width factor.
    bias : bool
        Whether the convolutions have biases.

    Shapes
    ------
    - a, b: (N, 1, H, W), any H and W.
    - Output: (N, 2, H, W); channel 0 is ``w_a``, channel 1 is ``w_b``.

    Example
    -------
    >>> generator = LossGenerator()
    >>> weights = generator(torch.rand(1, 1, 17, 23), torch.rand(1, 1, 17, 23))
    >>> weights.shape
    torch.Size([1, 2, 17, 23])
    >>> bool(torch.allclose(weights.sum(dim=1), torch.ones(1, 17, 23)))
    True
    """

    arch: ClassVar[str] = "loss_generator"
    trainer_role: ClassVar[str] = "loss_generator"
    in_channels: ClassVar[int] = 1
    out_channels: ClassVar[int] = 2

    def __init__(
        self,
        dim: int = 16,
        num_blocks: int = 2,
        num_heads: int = 8,
        ffn_expansion: float = 2.0,
        bias: bool = False,
    ) -> None:
        super().__init__(dim, num_blocks, num_heads, ffn_expansion, bias)
        self.decoder = restormer_stage(dim * 2, num_blocks, num_heads, ffn_expansion, bias)
        self.head_conv = nn.Conv2d(dim * 2, dim, kernel_size=3, padding=1, bias=bias)
        self.head_act = nn.PReLU(num_parameters=1, init=0.25)
        self.head_out = nn.Conv2d(dim, 2, kernel_size=3, padding=1, bias=bias)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-pixel weights of the two sources in the fusion loss.

        Parameters
        ----------
        a, b : torch.Tensor
            The sources, (N, 1, H, W), floating point.

        Returns
        -------
        torch.Tensor
            (N, 2, H, W), softmax over dim 1: channel 0 is ``w_a``, channel 1 is ``w_b``.

        Raises
        ------
        ValueError
            When the shapes or dtypes do not fit.
        """
        features_a, features_b = self.encode(a, b)
        features = torch.cat([features_a, features_b], dim=1)
        decoded = self.head_conv(self.run_blocks(self.decoder, features))
        logits = self.head_out(self.head_act(decoded))
        # The blocks work channels-last; hand back the usual layout.
        return torch.softmax(logits, dim=1).contiguous()

    def weights(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two weight maps as separate tensors.

        Parameters
        ----------
        a, b : torch.Tensor
            The sources, (N, 1, H, W).

        Returns
        -------
        w_a, w_b : torch.Tensor
            Each (N, 1, H, W); ``w_a + w_b = 1``.

        Example
        -------
        >>> w_a, w_b = LossGenerator().weights(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))
        >>> w_a.shape
        torch.Size([1, 1, 8, 8])
        """
        weights = self(a, b)
        return weights[:, :1], weights[:, 1:]
