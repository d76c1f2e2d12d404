"""The part ReFusionNet and LossGenerator share: one embedding and Restormer encoder per source."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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
    """

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
            When the shapes or dtypes do not fit.
        """
        check_source_pair(a, b, type(self).__name__)
        features_a = self.encoder_a(self.embed_a(to_channels_last(a)))
        features_b = self.encoder_b(self.embed_b(to_channels_last(b)))
        return features_a, features_b
