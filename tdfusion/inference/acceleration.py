"""Inference options of a fusion network: precision, channels-last weights, torch.compile.

:func:`accelerate` wraps a fusion network in :class:`AcceleratedFusion`, a module that
:func:`~tdfusion.inference.fuse_tensors` and the folder functions use like the network itself.
What each option does and costs (measured by ``benchmarks/inference.py``; see
:doc:`/howto/performance`):

- ``precision="fp32"`` (default): as trained. On the CPU, :class:`~tdfusion.nets.ReFusionNet`
  then runs its banded forward under inference mode, the fastest path there.
- ``precision="bf16"`` or ``"fp16"``: the convolutions and products run under
  :func:`torch.autocast` in that type (normalisations and softmax stay in float32), the output
  comes back in the input's dtype. Fused images then differ from float32 by up to about
  1e-2: with bf16, 8e-3 on the authors' weights and 7.5e-3 to 9.9e-3 on the bundled weights
  over the six 480x640 MSRS example pairs (2-3 grey levels of 255); with fp16 about 7e-4.
  Meant for GPUs; on the CPU they run the modules one after the other, bf16 no faster than the
  banded float32 forward and fp16 about 20 times slower.
- ``channels_last``: convolution weights in channels-last order, as cuDNN prefers them (the
  activations of the Restormer blocks are channels-last already). Default: on a GPU only.
- ``compile=True``: :func:`torch.compile` of the network, tried at the first call; when the
  compiler fails (no C++ compiler or Triton, an unsupported operation) a warning says so and
  the network runs uncompiled. A compiled ReFusionNet runs the modules, not the banded
  forward, so on the CPU it is not faster (and its first call takes minutes).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["PRECISIONS", "AcceleratedFusion", "Precision", "accelerate"]

Precision = Literal["fp32", "bf16", "fp16"]
#: The accepted precisions and the autocast dtype of each (``None``: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def _is_out_of_memory(error: Exception) -> bool:
    message = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in message


def _is_compiler_error(error: Exception) -> bool:
    return any(
        kind.__module__.startswith(("torch._dynamo", "torch._inductor"))
        for kind in type(error).__mro__
    )


class AcceleratedFusion(nn.Module):
    """A fusion network run with inference options (see :func:`accelerate`).

    Parameters
    ----------
    model : torch.nn.Module
        ``model(a, b) -> fused``; its parameters stay in its own dtype.
    precision : {"fp32", "bf16", "fp16"}
        Autocast dtype of the forward (``"fp32"``: none).
    channels_last : bool, optional
        Convert the model's 4-D weights to channels-last order (in place); ``None``: when the
        model is on a GPU.
    compile : bool
        Compile the model with :func:`torch.compile` (falls back to eager with a warning).
    compile_options : dict, optional
        Keyword arguments of :func:`torch.compile`, e.g. ``{"mode": "max-autotune"}``.

    Attributes
    ----------
    compiled : bool or None
        ``None`` before the first call with ``compile=True``; then whether compiling worked.
        ``False`` without ``compile``.

    Shapes
    ------
    - a, b: as the model takes them, e.g. (N, 1, H, W).
    - Output: the model's output, in the dtype of ``a``.

    Example
    -------
    >>> from tdfusion.nets import ReFusionNet
    >>> fast = AcceleratedFusion(ReFusionNet(dim=8, num_blocks=1, num_heads=2))
    >>> with torch.inference_mode():
    ...     fused = fast(torch.rand(1, 1, 16, 20), torch.rand(1, 1, 16, 20))
    >>> fused.shape, fused.dtype
    (torch.Size([1, 1, 16, 20]), torch.float32)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        precision: Precision = "fp32",
        channels_last: bool | None = None,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}"
            )
        self.model = model
        self.precision = precision
        parameter = next(model.parameters(), None)
        on_gpu = parameter is not None and parameter.device.type != "cpu"
        self.channels_last = on_gpu if channels_last is None else bool(channels_last)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self._compile_options = dict(compile_options or {})
        self._compiled_model: Any = None
        self.compiled: bool | None = None if compile else False

    def _autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=dtype)

    def _run(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.compiled is not False:
            try:
                if self._compiled_model is None:
                    self._compiled_model = torch.compile(self.model, **self._compile_options)
                with self._autocast(a.device.type):
                    fused = self._compiled_model(a, b)
            except Exception as error:
                # Out of memory is no compiler failure (the caller may tile); once compiled,
                # only the compiler's own errors (a new input size recompiles) mean falling back.
                if _is_out_of_memory(error) or (self.compiled and not _is_compiler_error(error)):
                    raise
                self._fall_back(error)
            else:
                self.compiled = True
                return fused
        with self._autocast(a.device.type):
            return self.model(a, b)

    def _fall_back(self, error: Exception) -> None:
        """Run eagerly from now on, and say so in one line."""
        self.compiled = False
        self._compiled_model = None
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__
        warnings.warn(
            f"torch.compile failed ({reason}); running the network uncompiled",
            RuntimeWarning,
            stacklevel=4,
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Fuse ``a`` and ``b`` with the options of this wrapper.

        Parameters
        ----------
        a, b : torch.Tensor
            The sources, as the model takes them.

        Returns
        -------
        torch.Tensor
            The fused image in ``a``'s dtype.
        """
        return self._run(a, b).to(a.dtype)

    def extra_repr(self) -> str:
        return (
            f"precision={self.precision!r}, channels_last={self.channels_last}, "
            f"compile={self.compiled is not False}"
        )


def accelerate(
    model: nn.Module,
    *,
    precision: Precision = "fp32",
    channels_last: bool | None = None,
    compile: bool = False,
    compile_options: dict[str, Any] | None = None,
) -> AcceleratedFusion:
    """Wrap a fusion network with inference options; see :class:`AcceleratedFusion`.

    Parameters
    ----------
    model : torch.nn.Module
        The fusion network, in eval mode on its device.
    precision, channels_last, compile, compile_options
        As in :class:`AcceleratedFusion`.

    Returns
    -------
    AcceleratedFusion
        A module to pass where the network would go (``fuse_tensors``, ``fuse_folders``).

    Raises
    ------
    ValueError
        For an unknown ``precision``.

    Example
    -------
    >>> from tdfusion.inference import fuse_tensors
    >>> from tdfusion.nets import ReFusionNet
    >>> fast = accelerate(ReFusionNet(dim=8, num_blocks=1, num_heads=2).eval(), precision="bf16")
    >>> fuse_tensors(fast, torch.rand(1, 1, 16, 20), torch.rand(1, 1, 16, 20)).dtype
    torch.float32
    """
    return AcceleratedFusion(
        model,
        precision=precision,
        channels_last=channels_last,
        compile=compile,
        compile_options=compile_options,
    )
