"""Restormer building blocks shared by the fusion network and the loss generator.

The blocks follow Restormer (Zamir et al., CVPR 2022) as used by ReFusion: a channel layer
norm, multi-Dconv head transposed attention (attention across channels, so its cost grows
linearly with the number of pixels), a gated-Dconv feed-forward network, and the
cross-attention fusion block that mixes the features of two sources. All of them accept any
spatial size and keep it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ChannelAttention",
    "CrossAttentionFusion",
    "GatedFeedForward",
    "LayerNorm2d",
    "RestormerBlock",
    "check_source_pair",
    "is_functorch_wrapped",
    "restormer_stage",
    "to_channels_last",
    "transposed_attention",
    "validate_widths",
]

#: Smallest norm ``F.normalize`` divides by; kept so the attention matches it exactly.
_NORMALIZE_EPS = 1e-12
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_source_pair(
    a: torch.Tensor, b: torch.Tensor, owner: str, dtype: torch.dtype | None = None
) -> None:
    """Check that two source images form a valid network input.

    Parameters
    ----------
    a, b : torch.Tensor
        The two sources.
    owner : str
        Name of the network, used in the error message.
    dtype : torch.dtype, optional
        The dtype of the network's parameters, which the sources must have unless autocast
        is on for their device (it then picks each operation's dtype).

    Raises
    ------
    ValueError
        When ``a`` or ``b`` is not 4-D, has more than one channel, the shapes differ, the
        dtype is not floating point or not ``dtype`` (the message names the shapes and
        dtypes).

    Shapes
    ------
    - a, b: (N, 1, H, W), both the same.

    Example
    -------
    >>> check_source_pair(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), "ReFusionNet")
    """
    if a.dim() != 4 or b.dim() != 4 or a.shape[1] != 1 or b.shape[1] != 1:
        raise ValueError(
            f"{owner} expects a and b of shape (N, 1, H, W); got a {tuple(a.shape)} "
            f"and b {tuple(b.shape)}"
        )
    if a.shape != b.shape:
        raise ValueError(
            f"{owner} expects a and b of the same shape; got a {tuple(a.shape)} "
            f"and b {tuple(b.shape)}"
        )
    if not (a.is_floating_point() and b.is_floating_point()) or a.dtype != b.dtype:
        raise ValueError(
            f"{owner} expects a and b of one floating dtype (images in [0, 1]); got a {a.dtype} "
            f"and b {b.dtype}"
        )
    if dtype is not None and a.dtype != dtype and not _autocasts(a.device.type):
        raise ValueError(
            f"{owner} has {dtype} parameters but got a and b of {a.dtype}; convert the images "
            f"or the network (.to(dtype)) so that they match, or run under torch.autocast"
        )
    if a.shape[2] == 0 or a.shape[3] == 0:
        raise ValueError(f"{owner} expects non-empty images; got shape {tuple(a.shape)}")


def _autocasts(device_type: str) -> bool:
    # Whether autocast is on for this device type (it mixes dtypes legitimately).
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def is_functorch_wrapped(x: torch.Tensor) -> bool:
    """Whether ``x`` is a tensor of a running :mod:`torch.func` transform (``vmap``, ``grad``).

    Parameters
    ----------
    x : torch.Tensor
        Any tensor.

    Returns
    -------
    bool
        True for the wrappers the transforms hand to the function they transform; False
        while :func:`torch.compile` traces (Dynamo cannot trace the check, and would break
        the graph there).

    Example
    -------
    >>> is_functorch_wrapped(torch.zeros(2))
    False
    >>> torch.func.vmap(lambda x: x * is_functorch_wrapped(x))(torch.ones(2))
    tensor([1., 1.])
    """
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(x)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` in channels-last memory order (a no-op when it already is).

    The blocks run fastest on channels-last tensors: oneDNN convolutions then skip their
    layout reorders, the layer norm reads each pixel's channels contiguously, and the
    attention reads queries, keys and values as (pixels x channels) matrices without
    copies. Values and shape are unchanged. Inside a :mod:`torch.func` transform
    (``vmap``, ``grad``, ...) ``x`` is returned as it is: a batched tensor has more dimensions
    than it shows, which the memory format cannot describe, and the blocks work on any layout.

    Parameters
    ----------
    x : torch.Tensor
        (N, C, H, W).

    Returns
    -------
    torch.Tensor
        The same values, strides of ``torch.channels_last``.

    Example
    -------
    >>> to_channels_last(torch.rand(1, 3, 4, 5)).is_contiguous(memory_format=torch.channels_last)
    True
    """
    if is_functorch_wrapped(x):
        return x
    if x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.to(memory_format=torch.channels_last)


def _pixel_major(features: torch.Tensor) -> torch.Tensor:
    # (N, C, H, W) -> (N, H * W, C): a view of a channels-last tensor (a copy otherwise).
    n, channels, height, width = features.shape
    return features.permute(0, 2, 3, 1).reshape(n, height * width, channels)


def _from_pixel_major(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # (N, H * W, C) -> (N, C, H, W); a channels-last view when the input is contiguous.
    n, _, channels = pixels.shape
    return pixels.reshape(n, height, width, channels).permute(0, 3, 1, 2)


def _output_slices(
    pointwise: nn.Conv2d, depthwise: nn.Conv2d, x: torch.Tensor, parts: int
) -> list[torch.Tensor]:
    # depthwise(pointwise(x)).chunk(parts, dim=1), computed part by part from slices of the
    # two convolutions' weights. The values are the same (each output channel depends only on
    # its own filters), but no part is a strided view of a shared tensor: the backward pass
    # then hands each part's gradient to its own convolutions instead of concatenating the
    # parts' gradients into one full-size tensor first (ReFusionNet's forward and backward
    # measured 13% faster on the CPU), and attention reads contiguous matrices. The two
    # convolution modules are read, not called: forward hooks on them do not fire.
    width = pointwise.out_channels // parts
    outputs = []
    for part in range(parts):
        channels = slice(part * width, (part + 1) * width)
        mixed = F.conv2d(x, pointwise.weight[channels], _bias_slice(pointwise, channels))
        outputs.append(
            F.conv2d(
                mixed,
                depthwise.weight[channels],
                _bias_slice(depthwise, channels),
                padding=depthwise.padding,
                groups=width,
            )
        )
    return outputs


def _bias_slice(conv: nn.Conv2d, channels: slice) -> torch.Tensor | None:
    return None if conv.bias is None else conv.bias[channels]


def _pixel_norm(pixels: torch.Tensor) -> torch.Tensor:
    # L2 norm over the pixel axis of (N, P, C), clamped like F.normalize (at 1e-12). Summing
    # the squares is accumulated pairwise, whereas vector_norm along this strided axis was
    # measured at ~2e-5 relative error for 480x640 float32 images. Clamping the square keeps
    # the gradient finite for an all-zero channel; half precision is summed in float32.
    if pixels.dtype in _HALF_DTYPES:
        pixels = pixels.float()
    squared = pixels.square().sum(dim=1)
    return squared.clamp_min(_NORMALIZE_EPS**2).sqrt()


def transposed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    temperature: torch.Tensor,
) -> torch.Tensor:
    """Multi-head channel ("transposed") attention with L2-normalised queries and keys.

    For each head ``h`` with channel block ``c_h``:
    ``out[:, c_h] = softmax(normalize(q_h)^T normalize(k_h) * temperature[h]) applied to v_h``,
    where the attention matrix is (channels x channels) and the normalisation runs over the
    pixels (``F.normalize`` semantics, norms clamped at 1e-12). All heads are computed with
    one (C x C) product whose off-head entries are masked before the softmax, so the inputs
    are read as they lie in memory; in single and double precision the norms divide that
    small matrix rather than the full-size queries and keys (in half precision the queries
    and keys are normalised first, so the product stays in range).

    Parameters
    ----------
    query, key, value : torch.Tensor
        Pixel-major features, (N, P, C) with ``P`` pixels; strided views are fine.
    temperature : torch.Tensor
        Per-head scale, (heads, 1, 1); ``C`` must be a multiple of ``heads``.

    Returns
    -------
    torch.Tensor
        (N, P, C), contiguous.

    Example
    -------
    >>> q = k = v = torch.rand(1, 30, 8)
    >>> transposed_attention(q, k, v, torch.ones(2, 1, 1)).shape
    torch.Size([1, 30, 8])
    """
    channels = query.shape[-1]
    num_heads = temperature.shape[0]
    head_of_channel = torch.arange(channels, device=query.device) // (channels // num_heads)
    query_norm = _pixel_norm(query)
    key_norm = _pixel_norm(key)
    row_temperature = temperature.reshape(num_heads, 1)[head_of_channel]
    if query.dtype in _HALF_DTYPES or key.dtype in _HALF_DTYPES:
        # Unnormalised products over all pixels could leave float16's range: normalise first.
        query = query / query_norm[:, None, :].to(query.dtype)
        key = key / key_norm[:, None, :].to(key.dtype)
        logits = (query.transpose(1, 2) @ key) * row_temperature
    else:
        scale = row_temperature / (query_norm[:, :, None] * key_norm[:, None, :])
        logits = (query.transpose(1, 2) @ key) * scale
    other_head = head_of_channel[:, None] != head_of_channel[None, :]
    attention = torch.softmax(logits.masked_fill(other_head, float("-inf")), dim=-1)
    return value @ attention.transpose(1, 2)


class LayerNorm2d(nn.Module):
    """Layer norm over the channel axis of an (N, C, H, W) tensor, with weight and bias.

    Each pixel's C values are normalised by their mean and population variance,
    ``(x - mean) / sqrt(var + eps) * weight + bias`` (Restormer's "WithBias" layer norm).
    A channels-last input (what the networks of this package pass) goes through the native
    layer-norm kernel on its (N, H, W, C) view; any other layout is reduced over the channel
    axis directly. Neither path copies the input to reorder it.

    Parameters
    ----------
    num_channels : int
        C.
    eps : float
        Added to the variance.

    Shapes
    ------
    - Input: (N, C, H, W)
    - Output: (N, C, H, W)

    Example
    -------
    >>> LayerNorm2d(16)(torch.rand(2, 16, 5, 7)).shape
    torch.Size([2, 16, 5, 7])
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # vmap cannot tell a batched tensor's memory format: it takes the general path.
        if not is_functorch_wrapped(x) and x.is_contiguous(memory_format=torch.channels_last):
            # Each pixel's channels lie together, as F.layer_norm wants them: no copy needed.
            pixels = x.permute(0, 2, 3, 1)
            normalised = F.layer_norm(pixels, pixels.shape[-1:], self.weight, self.bias, self.eps)
            return normalised.permute(0, 3, 1, 2)
        variance, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        normalised = (x - mean) * torch.rsqrt(variance + self.eps)
        return torch.addcmul(self.bias[:, None, None], normalised, self.weight[:, None, None])

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class ChannelAttention(nn.Module):
    """Multi-Dconv head transposed attention (Restormer's MDTA).

    A 1x1 convolution and a 3x3 depthwise convolution make queries, keys and values; the
    channels are split into heads, and each head attends across its channels (not pixels)
    with L2-normalised queries and keys and a learnable temperature; a 1x1 convolution
    projects the result.

    Parameters
    ----------
    dim : int
        Channels in and out; must be divisible by ``num_heads``.
    num_heads : int
        Attention heads.
    bias : bool
        Whether the convolutions have biases.

    Shapes
    ------
    - Input: (N, dim, H, W)
    - Output: (N, dim, H, W)

    Example
    -------
    >>> ChannelAttention(16, num_heads=8)(torch.rand(1, 16, 9, 11)).shape
    torch.Size([1, 16, 9, 11])
    """

    def __init__(self, dim: int, num_heads: int, bias: bool = False) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv = nn.Conv2d(
            dim * 3, dim * 3, kernel_size=3, padding=1, groups=dim * 3, bias=bias
        )
        self.project_out = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        parts = _output_slices(self.qkv, self.qkv_dwconv, x, 3)
        query, key, value = (_pixel_major(part) for part in parts)
        attended = transposed_attention(query, key, value, self.temperature)
        return self.project_out(_from_pixel_major(attended, height, width))


class GatedFeedForward(nn.Module):
    """Gated-Dconv feed-forward network (Restormer's GDFN).

    A 1x1 convolution expands to ``2 * hidden`` channels, a 3x3 depthwise convolution mixes
    neighbours, one half gates the other through GELU, and a 1x1 convolution projects back.

    Parameters
    ----------
    dim : int
        Channels in and out.
    expansion : float
        ``hidden = int(dim * expansion)``.
    bias : bool
        Whether the convolutions have biases.

    Shapes
    ------
    - Input: (N, dim, H, W)
    - Output: (N, dim, H, W)

    Example
    -------
    >>> GatedFeedForward(16, expansion=2.0)(torch.rand(1, 16, 9, 11)).shape
    torch.Size([1, 16, 9, 11])
    """

    def __init__(self, dim: int, expansion: float = 2.0, bias: bool = False) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.project_in = nn.Conv2d(dim, hidden * 2, kernel_size=1, bias=bias)
        self.dwconv = nn.Conv2d(
            hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=bias
        )
        self.project_out = nn.Conv2d(hidden, dim, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, content = _output_slices(self.project_in, self.dwconv, x, 2)
        return self.project_out(F.gelu(gate) * content)


class RestormerBlock(nn.Module):
    """Restormer transformer block: pre-norm residual attention, then pre-norm residual FFN.

    ``x = x + attn(attn_norm(x)); x = x + ffn(ffn_norm(x))``.

    Parameters
    ----------
    dim : int
        Channels in and out; divisible by ``num_heads``.
    num_heads : int
        Attention heads.
    ffn_expansion : float
        Hidden width factor of the feed-forward network.
    bias : bool
        Whether the convolutions have biases (the layer norms always have one).

    Shapes
    ------
    - Input: (N, dim, H, W)
    - Output: (N, dim, H, W)

    Example
    -------
    >>> RestormerBlock(16, num_heads=8)(torch.rand(2, 16, 7, 5)).shape
    torch.Size([2, 16, 7, 5])
    """

    def __init__(
        self, dim: int, num_heads: int = 8, ffn_expansion: float = 2.0, bias: bool = False
    ) -> None:
        super().__init__()
        self.attn_norm = LayerNorm2d(dim)
        self.attn = ChannelAttention(dim, num_heads, bias)
        self.ffn_norm = LayerNorm2d(dim)
        self.ffn = GatedFeedForward(dim, ffn_expansion, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ffn(self.ffn_norm(x))


class CrossAttentionFusion(nn.Module):
    """Cross-attention fusion of two feature maps (ReFusion's AFM block).

    Each source makes its own queries, keys and values. Source a's keys and values are read
    with source b's queries (temperature ``temperature_a``) and the result, projected, is
    added to a's features; symmetrically for b. The two updated maps are concatenated
    (``2 * dim`` channels) and refined by a gated branch per source: a gate computed from
    both sources (GELU) multiplies a depthwise-expanded copy of that source, and each branch
    is projected to ``2 * dim`` channels and added to the concatenation.

    Parameters
    ----------
    dim : int
        Channels of each input; divisible by ``num_heads``.
    num_heads : int
        Attention heads.
    bias : bool
        Whether the convolutions have biases.

    Shapes
    ------
    - features_a, features_b: (N, dim, H, W)
    - Output: (N, 2 * dim, H, W), channels ``[:dim]`` from a, ``[dim:]`` from b before the
      gated refinement.

    Example
    -------
    >>> fusion = CrossAttentionFusion(16, num_heads=8)
    >>> fusion(torch.rand(1, 16, 9, 11), torch.rand(1, 16, 9, 11)).shape
    torch.Size([1, 32, 9, 11])
    """

    def __init__(self, dim: int, num_heads: int = 8, bias: bool = False) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.temperature_a = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.temperature_b = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv_a = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv_a = _depthwise(dim * 3, bias)
        self.qkv_b = nn.Conv2d(dim, dim * 3, kernel_size=1, bias=bias)
        self.qkv_dwconv_b = _depthwise(dim * 3, bias)
        self.attn_project_a = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self.attn_project_b = nn.Conv2d(dim, dim, kernel_size=1, bias=bias)
        self.gate_in = nn.Conv2d(dim * 2, dim * 8, kernel_size=1, bias=bias)
        self.gate_dwconv = _depthwise(dim * 8, bias)
        self.expand_a = nn.Conv2d(dim, dim * 4, kernel_size=1, bias=bias)
        self.expand_dwconv_a = _depthwise(dim * 4, bias)
        self.expand_b = nn.Conv2d(dim, dim * 4, kernel_size=1, bias=bias)
        self.expand_dwconv_b = _depthwise(dim * 4, bias)
        self.project_out_a = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)
        self.project_out_b = nn.Conv2d(dim * 4, dim * 2, kernel_size=1, bias=bias)

    def forward(self, features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
        height, width = features_a.shape[-2:]
        parts_a = _output_slices(self.qkv_a, self.qkv_dwconv_a, features_a, 3)
        parts_b = _output_slices(self.qkv_b, self.qkv_dwconv_b, features_b, 3)
        query_a, key_a, value_a = (_pixel_major(part) for part in parts_a)
        query_b, key_b, value_b = (_pixel_major(part) for part in parts_b)
        attended_a = transposed_attention(query_b, key_a, value_a, self.temperature_a)
        attended_b = transposed_attention(query_a, key_b, value_b, self.temperature_b)
        features_a = features_a + self.attn_project_a(_from_pixel_major(attended_a, height, width))
        features_b = features_b + self.attn_project_b(_from_pixel_major(attended_b, height, width))
        joint = torch.cat([features_a, features_b], dim=1)
        gate_a, gate_b = _output_slices(self.gate_in, self.gate_dwconv, joint, 2)
        branch_a = F.gelu(gate_a) * self.expand_dwconv_a(self.expand_a(features_a))
        branch_b = F.gelu(gate_b) * self.expand_dwconv_b(self.expand_b(features_b))
        return joint + self.project_out_a(branch_a) + self.project_out_b(branch_b)


def validate_widths(dim: int, num_blocks: int, num_heads: int, ffn_expansion: float) -> None:
    """Check the width/depth arguments shared by the networks of this package.

    Parameters
    ----------
    dim : int
        Feature channels per source; a positive multiple of ``num_heads``.
    num_blocks : int
        Restormer blocks per stage, >= 0.
    num_heads : int
        Attention heads, >= 1.
    ffn_expansion : float
        Feed-forward width factor; ``int(dim * ffn_expansion)`` must be >= 1.

    Raises
    ------
    ValueError
        Naming the argument that is out of range.

    Example
    -------
    >>> validate_widths(16, 2, 8, 2.0)
    """
    if num_heads < 1 or dim < 1 or dim % num_heads:
        raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    if int(dim * ffn_expansion) < 1:
        raise ValueError(f"ffn_expansion {ffn_expansion} leaves no hidden channels at dim {dim}")


def restormer_stage(
    dim: int, num_blocks: int, num_heads: int, ffn_expansion: float, bias: bool
) -> nn.Sequential:
    """A sequence of ``num_blocks`` :class:`RestormerBlock` of width ``dim``.

    Parameters
    ----------
    dim, num_blocks, num_heads, ffn_expansion, bias
        As in :class:`RestormerBlock`; ``num_blocks = 0`` gives the identity.

    Returns
    -------
    nn.Sequential
        The stage.

    Example
    -------
    >>> len(restormer_stage(16, 2, 8, 2.0, False))
    2
    """
    return nn.Sequential(
        *(RestormerBlock(dim, num_heads, ffn_expansion, bias) for _ in range(num_blocks))
    )


def _depthwise(channels: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, kernel_size=3, padding=1, groups=channels, bias=bias)


def _check_heads(dim: int, num_heads: int) -> None:
    if num_heads < 1 or dim % num_heads:
        raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
