"""Inference of ReFusionNet band by band: the same output, a fraction of the memory traffic.

A Restormer block at 480 x 640 makes intermediates of 20 to 160 MB each (up to 128 channels
per pixel), so the plain forward streams every one of them through main memory, and on the
CPU each new tensor of that size also costs the kernel a fault per page. Yet everything in the
network is pointwise or a 3x3 convolution, except the channel attention, which needs only two
small statistics of the whole image: the (C x C) product of queries and keys and their norms.
So each block runs in two sweeps over bands of a few rows (with one row of halo for the 3x3
convolutions), whose intermediates stay in the cache:

1. layer norm, the query/key/value projections and their depthwise convolutions; the
   (C x C) product and the norms are accumulated, the values kept;
2. the attention matrix, folded with the output projection into one (C x C) matrix, is applied
   to the values and added to the input; the feed-forward network follows in the same band.

The result equals :meth:`ReFusionNet.forward <tdfusion.nets.ReFusionNet.forward>` up to
float rounding (the attention is folded into its output projection and sums are taken in
another order: about 1e-6 in float32). Only the forward is computed: no autograd, no
forward-mode derivative. :class:`~tdfusion.nets.ReFusionNet` runs it by itself under
:func:`torch.inference_mode` on the CPU (see ``ReFusionNet.banded``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from tdfusion.nets.layers import (
    CrossAttentionFusion,
    RestormerBlock,
    check_source_pair,
)

if TYPE_CHECKING:
    from tdfusion.nets.refusion import ReFusionNet

__all__ = ["DEFAULT_BAND_PIXELS", "band_rows", "banded_forward"]

#: Pixels per band: 8192 keeps the largest intermediate of the default network (64 channels of
#: float32) at 2 MiB, the size of this reference machine's L2 caches together.
DEFAULT_BAND_PIXELS = 8192
_NORMALIZE_EPS = 1e-12
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_Result = TypeVar("_Result")
_Sums = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def band_rows(height: int, width: int, band_pixels: int = DEFAULT_BAND_PIXELS) -> int:
    """Rows per band for an image of ``width`` columns: about ``band_pixels`` pixels, >= 1.

    Parameters
    ----------
    height, width : int
        Image size.
    band_pixels : int
        Target pixels per band.

    Returns
    -------
    int
        Between 1 and ``height``.

    Example
    -------
    >>> band_rows(480, 640)
    12
    """
    return max(1, min(height, band_pixels // max(width, 1)))


def _bands(height: int, rows: int) -> Iterator[tuple[int, int, int, int]]:
    # (first, stop) of each band and (start, end) of its rows with one row of halo.
    for first in range(0, height, rows):
        stop = min(first + rows, height)
        yield first, stop, max(first - 1, 0), min(stop + 1, height)


def _conv_rows(
    band: torch.Tensor,
    conv: nn.Conv2d,
    first: int,
    stop: int,
    height: int,
    channels: slice | None = None,
) -> torch.Tensor:
    # A 3x3 convolution (padding 1) of rows [first, stop), given the (N, rows, W, C) input rows
    # [first - 1, stop + 1) clipped to the image; zero rows stand in beyond its edges. With
    # ``channels``, that slice of a depthwise convolution's channels (``band`` holds those).
    weight, bias, groups = conv.weight, conv.bias, conv.groups
    if channels is not None:
        weight = weight[channels]
        bias = None if bias is None else bias[channels]
        groups = weight.shape[0]
    top, bottom = int(first == 0), int(stop == height)
    if top or bottom:
        band = F.pad(band, (0, 0, 0, 0, top, bottom))
    out = F.conv2d(band.permute(0, 3, 1, 2), weight, bias, padding=(0, 1), groups=groups)
    return out.permute(0, 2, 3, 1).contiguous()


def _pointwise(
    conv: nn.Conv2d, channels: slice | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # A 1x1 convolution (or the output channels ``channels`` of it) as F.linear's weight and
    # bias. Gates and contents are computed apart, so that each lies contiguous for GELU.
    weight, bias = conv.weight[:, :, 0, 0], conv.bias
    if channels is None:
        return weight, bias
    return weight[channels], None if bias is None else bias[channels]


def _layer_norm(band: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    # LayerNorm2d of a channels-last band: the native kernel over the last axis.
    return F.layer_norm(band, band.shape[-1:], norm.weight, norm.bias, norm.eps)


class _AttentionStatistics:
    """The whole-image sums one channel attention needs: ``q^T k`` and the squared norms.

    Each band's sums are computed apart (:meth:`of_band`) and added in band order, so the
    result does not depend on which thread computed which band. Half-precision queries and
    keys are summed in float32: sums over a whole image leave float16's range (65504) and
    lose bfloat16's few digits; :meth:`mixing` hands back the network's dtype.
    """

    def __init__(self, partials: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        product, query_squares, key_squares = (
            torch.stack(sums).sum(dim=0) for sums in zip(*partials)
        )
        self.product, self.query_squares, self.key_squares = product, query_squares, key_squares

    @staticmethod
    def of_band(
        query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q^T k, sum q^2, sum k^2)`` of one band's (N, rows, W, C) queries and keys."""
        query = query.flatten(1, 2)  # (N, pixels, C)
        key = key.flatten(1, 2)
        if query.dtype in _HALF_DTYPES:
            query, key = query.float(), key.float()
        return (
            torch.bmm(query.transpose(1, 2), key),
            query.square().sum(dim=1),
            key.square().sum(dim=1),
        )

    def mixing(self, temperature: torch.Tensor, project_out: nn.Conv2d) -> torch.Tensor:
        """``(W_out A)^T`` per sample: attention then output projection, for row vectors.

        Computed in the statistics' dtype (float32 for a half-precision network) and returned
        in the dtype of ``project_out``'s weight.
        """
        channels = self.product.shape[-1]
        num_heads = temperature.shape[0]
        head = torch.arange(channels, device=self.product.device) // (channels // num_heads)
        row_temperature = temperature.reshape(num_heads, 1)[head].to(self.product.dtype)
        query_norm = self.query_squares.clamp_min(_NORMALIZE_EPS**2).sqrt()
        key_norm = self.key_squares.clamp_min(_NORMALIZE_EPS**2).sqrt()
        logits = self.product * (row_temperature / (query_norm[:, :, None] * key_norm[:, None, :]))
        logits = logits.masked_fill(head[:, None] != head[None, :], float("-inf"))
        attention = torch.softmax(logits, dim=-1)
        weight = project_out.weight[:, :, 0, 0]
        mixing = (weight.to(attention.dtype) @ attention).transpose(1, 2)
        return mixing.to(weight.dtype)


def _attend(
    features: torch.Tensor,
    values: torch.Tensor,
    mixing: torch.Tensor,
    bias: torch.Tensor | None,
    start: int,
    end: int,
) -> torch.Tensor:
    # Rows [start, end) of features + project_out(attention(values)), (N, rows, W, C).
    attended = torch.baddbmm(
        features[:, start:end].flatten(1, 2), values[:, start:end].flatten(1, 2), mixing
    )
    if bias is not None:
        attended += bias
    return attended.unflatten(1, (end - start, features.shape[2]))


class _Sweeps:
    """Runs a function of ``(first, stop, start, end)`` on every band, on ``pool`` if given."""

    def __init__(self, height: int, rows: int, pool: ThreadPoolExecutor | None) -> None:
        self.height = height
        self.bands = list(_bands(height, rows))
        self.pool = pool

    def map(self, function: Callable[[int, int, int, int], _Result]) -> list[_Result]:
        """``function`` of every band, in band order."""
        if self.pool is None:
            return [function(*band) for band in self.bands]

        def in_worker(band: tuple[int, int, int, int]) -> _Result:
            with torch.inference_mode():  # a thread-local mode: enter it in each worker
                return function(*band)

        return list(self.pool.map(in_worker, self.bands))


def _embed(conv: nn.Conv2d, source: torch.Tensor, sweeps: _Sweeps) -> torch.Tensor:
    # The 3x3 embedding of a one-channel source, written channels-last band by band.
    batch, _, height, width = source.shape
    pixels = source.permute(0, 2, 3, 1)  # (N, H, W, 1): the same memory as (N, 1, H, W)
    out = source.new_empty(batch, height, width, conv.out_channels)

    def band(first: int, stop: int, start: int, end: int) -> None:
        out[:, first:stop] = _conv_rows(pixels[:, start:end], conv, first, stop, height)

    sweeps.map(band)
    return out


def _block(block: RestormerBlock, features: torch.Tensor, sweeps: _Sweeps) -> torch.Tensor:
    # One Restormer block in two sweeps, channels-last (N, H, W, C) in and out.
    batch, height, width, channels = features.shape
    attention, ffn = block.attn, block.ffn
    qkv_weight, qkv_bias = _pointwise(attention.qkv)
    values = features.new_empty(batch, height, width, channels)

    def first_sweep(first: int, stop: int, start: int, end: int) -> _Sums:
        normalised = _layer_norm(features[:, start:end], block.attn_norm)
        qkv = _conv_rows(
            F.linear(normalised, qkv_weight, qkv_bias), attention.qkv_dwconv, first, stop, height
        )
        values[:, first:stop] = qkv[..., 2 * channels :]
        return _AttentionStatistics.of_band(qkv[..., :channels], qkv[..., channels : 2 * channels])

    statistics = _AttentionStatistics(sweeps.map(first_sweep))
    mixing = statistics.mixing(attention.temperature, attention.project_out)
    out_weight, out_bias = _pointwise(ffn.project_out)
    gate_half, content_half = slice(0, out_weight.shape[1]), slice(out_weight.shape[1], None)
    gate_in, content_in = (
        _pointwise(ffn.project_in, gate_half),
        _pointwise(ffn.project_in, content_half),
    )
    out = torch.empty_like(features)

    def second_sweep(first: int, stop: int, start: int, end: int) -> None:
        attended = _attend(features, values, mixing, attention.project_out.bias, start, end)
        normalised = _layer_norm(attended, block.ffn_norm)
        gate = _conv_rows(
            F.linear(normalised, *gate_in), ffn.dwconv, first, stop, height, gate_half
        )
        content = _conv_rows(
            F.linear(normalised, *content_in), ffn.dwconv, first, stop, height, content_half
        )
        gated = F.gelu(gate).mul_(content)
        residual = attended[:, first - start : stop - start]
        torch.add(residual, F.linear(gated, out_weight, out_bias), out=out[:, first:stop])

    sweeps.map(second_sweep)
    return out


def _fusion(
    fusion: CrossAttentionFusion,
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    sweeps: _Sweeps,
) -> torch.Tensor:
    # The cross-attention fusion block in two sweeps; (N, H, W, 2C) out.
    batch, height, width, channels = features_a.shape
    qkv_a, qkv_b = _pointwise(fusion.qkv_a), _pointwise(fusion.qkv_b)
    values_a = features_a.new_empty(batch, height, width, channels)
    values_b = features_a.new_empty(batch, height, width, channels)

    def first_sweep(first: int, stop: int, start: int, end: int) -> tuple[_Sums, _Sums]:
        band_a = _conv_rows(
            F.linear(features_a[:, start:end], *qkv_a), fusion.qkv_dwconv_a, first, stop, height
        )
        band_b = _conv_rows(
            F.linear(features_b[:, start:end], *qkv_b), fusion.qkv_dwconv_b, first, stop, height
        )
        values_a[:, first:stop] = band_a[..., 2 * channels :]
        values_b[:, first:stop] = band_b[..., 2 * channels :]
        keys = slice(channels, 2 * channels)
        return (
            _AttentionStatistics.of_band(band_b[..., :channels], band_a[..., keys]),
            _AttentionStatistics.of_band(band_a[..., :channels], band_b[..., keys]),
        )

    sums = sweeps.map(first_sweep)
    # a attends with b's queries to its own keys, and b with a's queries.
    mixing_a = _AttentionStatistics([s[0] for s in sums]).mixing(
        fusion.temperature_a, fusion.attn_project_a
    )
    mixing_b = _AttentionStatistics([s[1] for s in sums]).mixing(
        fusion.temperature_b, fusion.attn_project_b
    )
    expand_a, expand_b = _pointwise(fusion.expand_a), _pointwise(fusion.expand_b)
    # joint + P_a branch_a + P_b branch_b = joint + [P_a P_b] [branch_a; branch_b]
    (out_a, bias_a), (out_b, bias_b) = (
        _pointwise(fusion.project_out_a),
        _pointwise(fusion.project_out_b),
    )
    out_weight = torch.cat([out_a, out_b], dim=1)
    out_bias = None if bias_a is None or bias_b is None else bias_a + bias_b
    half_a, half_b = slice(0, out_a.shape[1]), slice(out_a.shape[1], None)
    gate_in_a, gate_in_b = _pointwise(fusion.gate_in, half_a), _pointwise(fusion.gate_in, half_b)
    out = features_a.new_empty(batch, height, width, 2 * channels)

    def second_sweep(first: int, stop: int, start: int, end: int) -> None:
        updated_a = _attend(features_a, values_a, mixing_a, fusion.attn_project_a.bias, start, end)
        updated_b = _attend(features_b, values_b, mixing_b, fusion.attn_project_b.bias, start, end)
        joint = torch.cat([updated_a, updated_b], dim=-1)
        gate_a = _conv_rows(
            F.linear(joint, *gate_in_a), fusion.gate_dwconv, first, stop, height, half_a
        )
        gate_b = _conv_rows(
            F.linear(joint, *gate_in_b), fusion.gate_dwconv, first, stop, height, half_b
        )
        branch_a = _conv_rows(
            F.linear(updated_a, *expand_a), fusion.expand_dwconv_a, first, stop, height
        )
        branch_b = _conv_rows(
            F.linear(updated_b, *expand_b), fusion.expand_dwconv_b, first, stop, height
        )
        branch_a.mul_(F.gelu(gate_a))
        branch_b.mul_(F.gelu(gate_b))
        branches = torch.cat([branch_a, branch_b], dim=-1)
        torch.add(
            joint[:, first - start : stop - start],
            F.linear(branches, out_weight, out_bias),
            out=out[:, first:stop],
        )

    sweeps.map(second_sweep)
    return out


def _head(net: ReFusionNet, features: torch.Tensor, sweeps: _Sweeps) -> torch.Tensor:
    # 3x3 convolution, activation, 3x3 convolution, sigmoid; (N, 1, H, W) out.
    batch, height, width, _ = features.shape
    out = features.new_empty(batch, height, width, 1)

    def band(first: int, stop: int, start: int, end: int) -> None:
        # The outer convolution needs the inner one's rows [start, end), which need one more.
        inner_rows = features[:, max(start - 1, 0) : min(end + 1, height)]
        inner = net.head_act(_conv_rows(inner_rows, net.head_conv, start, end, height))
        torch.sigmoid(_conv_rows(inner, net.head_out, first, stop, height), out=out[:, first:stop])

    sweeps.map(band)
    return out.permute(0, 3, 1, 2)


def _forward(net: ReFusionNet, a: torch.Tensor, b: torch.Tensor, sweeps: _Sweeps) -> torch.Tensor:
    features_a = _embed(net.embed_a, a, sweeps)
    features_b = _embed(net.embed_b, b, sweeps)
    for block in net.encoder_a:
        features_a = _block(block, features_a, sweeps)
    for block in net.encoder_b:
        features_b = _block(block, features_b, sweeps)
    features = _fusion(net.fusion, features_a, features_b, sweeps)
    del features_a, features_b
    for block in net.decoder:
        features = _block(block, features, sweeps)
    return _head(net, features, sweeps)


def banded_forward(
    net: ReFusionNet,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    band_pixels: int = DEFAULT_BAND_PIXELS,
    threads: int | None = None,
) -> torch.Tensor:
    """ReFusionNet's forward computed band by band (inference only).

    Parameters
    ----------
    net : ReFusionNet
        The network whose parameters are used.
    a, b : torch.Tensor
        The sources, (N, 1, H, W), floating point.
    band_pixels : int
        About how many pixels each band holds (see :func:`band_rows`).
    threads : int, optional
        Bands computed at once, each by one thread; ``None``: ``torch.get_num_threads()``.
        While it runs with more than one, PyTorch's own thread count is set to 1 (and put
        back afterwards), so that each band's operations run where its thread is.

    Returns
    -------
    torch.Tensor
        The fused image (N, 1, H, W), equal to ``net(a, b)`` up to float rounding.

    Raises
    ------
    ValueError
        When the shapes or dtypes do not fit.

    Example
    -------
    >>> from tdfusion.nets import ReFusionNet
    >>> net = ReFusionNet()
    >>> a, b = torch.rand(1, 1, 20, 24), torch.rand(1, 1, 20, 24)
    >>> with torch.inference_mode():
    ...     fused = banded_forward(net, a, b, band_pixels=64)
    ...     plain = ReFusionNet.forward(net, a, b)
    >>> bool((fused - plain).abs().max() < 1e-5)
    True
    """
    check_source_pair(a, b, type(net).__name__, net.embed_a.weight.dtype)
    height, width = a.shape[-2:]
    rows = band_rows(height, width, band_pixels)
    threads = torch.get_num_threads() if threads is None else threads
    if threads <= 1 or len(range(0, height, rows)) == 1:
        return _forward(net, a, b, _Sweeps(height, rows, None))
    # One thread per band at a time: PyTorch's own threads would meet at a barrier after every
    # operation of every band, and wait there for long on a machine that also runs other work.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers, started now, take this setting
    try:
        with ThreadPoolExecutor(threads, thread_name_prefix="tdfusion-band") as pool:
            return _forward(net, a, b, _Sweeps(height, rows, pool))
    finally:
        torch.set_num_threads(previous)
