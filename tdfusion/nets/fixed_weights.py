"""Fixed fusion-loss weights: a loss "generator" with no parameters, for fixed-loss training."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

__all__ = ["FixedLossWeights"]

FixedRule = Literal["equal", "max_intensity"]


class FixedLossWeights(nn.Module):
    """Per-pixel loss weights from a fixed rule, in place of a trained :class:`LossGenerator`.

    It returns weights in the generator's format, so a trainer or a loss takes it wherever it
    takes a generator; it has no parameters, so nothing about it is learned (train with
    ``meta_steps=0``).

    Rules:

    - ``"equal"``: ``w_a = w_b = 1/2`` everywhere. With the learnable fusion loss this is the
      fixed-loss baseline of the paper's ablation: the intensity target is the mean of the
      two sources.
    - ``"max_intensity"``: ``w_a = 1`` where ``a >= b`` and ``w_b = 1`` elsewhere. The
      weighted intensity term then equals ``mean((f - max(a, b))^2)``: the target keeps, at
      every pixel, the brighter source (warm targets from infrared, lit scenery from the
      visible image), the usual fixed target of infrared-visible fusion.

    Parameters
    ----------
    rule : {"equal", "max_intensity"}
        How the weights are set.

    Shapes
    ------
    - a, b: (N, C, H, W) with C = 1.
    - Output: (N, 2, H, W); channel 0 is ``w_a``, channel 1 is ``w_b``, summing to one.

    Example
    -------
    >>> a = torch.tensor([[[[0.2, 0.9]]]])
    >>> b = torch.tensor([[[[0.5, 0.1]]]])
    >>> FixedLossWeights("max_intensity")(a, b)[0, 0].tolist()
    [[0.0, 1.0]]
    >>> FixedLossWeights("equal")(a, b)[0, 1].tolist()
    [[0.5, 0.5]]
    """

    rules: ClassVar[tuple[str, ...]] = ("equal", "max_intensity")

    def __init__(self, rule: FixedRule = "equal") -> None:
        super().__init__()
        if rule not in self.rules:
            raise ValueError(f"rule must be one of {self.rules}, got {rule!r}")
        self.rule: FixedRule = rule

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The weights ``(w_a, w_b)`` of each pixel, stacked on dim 1.

        Parameters
        ----------
        a, b : torch.Tensor
            The sources, (N, 1, H, W).

        Returns
        -------
        torch.Tensor
            (N, 2, H, W).

        Raises
        ------
        ValueError
            When ``a`` and ``b`` are not two (N, 1, H, W) tensors of one shape.
        """
        if a.dim() != 4 or a.shape[1] != 1 or a.shape != b.shape:
            raise ValueError(
                "FixedLossWeights takes two (N, 1, H, W) sources of one shape, got "
                f"a {tuple(a.shape)} and b {tuple(b.shape)}"
            )
        if self.rule == "equal":
            weight_a = torch.full_like(a, 0.5)
        else:
            weight_a = (a >= b).to(a.dtype)
        return torch.cat([weight_a, 1.0 - weight_a], dim=1)

    def extra_repr(self) -> str:
        return f"rule={self.rule!r}"
