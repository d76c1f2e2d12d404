"""The research code's way of running the ReFusion network and the loss generator.

The baseline of the inference benchmark and, in training, of the meta-step benchmark's
"research code" variant (``_research_mechanics.py`` with ``network="research"``).

The same computation as :class:`tdfusion.nets.ReFusionNet` and
:class:`tdfusion.nets.LossGenerator` (same parameters, same outputs),
written the way the research implementation executes it: channels-first tensors throughout,
the layer norm through a (N, H*W, C) copy with an explicit mean and variance and back,
attention heads split by reshaping (N, C, H, W) into (N, heads, C/heads, H*W) with the queries
and keys normalised over the full-size tensors, and the parts of one convolution's output
taken with ``chunk``. The functions read the parameters as the modules' attributes, so fast
weights written into a module are used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tdfusion.nets import LossGenerator, ReFusionNet


def _layer_norm(x, norm):
    n, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # 'b c h w -> b (h w) c' (a copy)
    mean = pixels.mean(-1, keepdim=True)
    variance = pixels.var(-1, keepdim=True, unbiased=False)
    pixels = (pixels - mean) / torch.sqrt(variance + 1e-5) * norm.weight + norm.bias
    return pixels.reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()


def _heads(x, heads):
    n, c, h, w = x.shape
    return x.reshape(n, heads, c // heads, h * w)


def _attend(query, key, value, temperature, heads, shape):
    query = F.normalize(_heads(query, heads), dim=-1)
    key = F.normalize(_heads(key, heads), dim=-1)
    attention = (query @ key.transpose(-2, -1) * temperature).softmax(dim=-1)
    return (attention @ _heads(value, heads)).reshape(shape)


def _conv(conv, x):
    return F.conv2d(
        x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups
    )


def _block(block, x):
    attention = block.attn
    q, k, v = _conv(
        attention.qkv_dwconv, _conv(attention.qkv, _layer_norm(x, block.attn_norm))
    ).chunk(3, 1)
    x = x + _conv(
        attention.project_out, _attend(q, k, v, attention.temperature, attention.num_heads, x.shape)
    )
    ffn = block.ffn
    gate, value = _conv(ffn.dwconv, _conv(ffn.project_in, _layer_norm(x, block.ffn_norm))).chunk(
        2, 1
    )
    return x + _conv(ffn.project_out, F.gelu(gate) * value)


def _fusion(fusion, x_a, x_b):
    q_a, k_a, v_a = _conv(fusion.qkv_dwconv_a, _conv(fusion.qkv_a, x_a)).chunk(3, 1)
    q_b, k_b, v_b = _conv(fusion.qkv_dwconv_b, _conv(fusion.qkv_b, x_b)).chunk(3, 1)
    heads = fusion.num_heads
    attended_a = _attend(q_b, k_a, v_a, fusion.temperature_a, heads, x_a.shape)
    attended_b = _attend(q_a, k_b, v_b, fusion.temperature_b, heads, x_b.shape)
    x_a = x_a + _conv(fusion.attn_project_a, attended_a)
    x_b = x_b + _conv(fusion.attn_project_b, attended_b)
    joint = torch.cat([x_a, x_b], 1)
    gate_a, gate_b = _conv(fusion.gate_dwconv, _conv(fusion.gate_in, joint)).chunk(2, 1)
    branch_a = F.gelu(gate_a) * _conv(fusion.expand_dwconv_a, _conv(fusion.expand_a, x_a))
    branch_b = F.gelu(gate_b) * _conv(fusion.expand_dwconv_b, _conv(fusion.expand_b, x_b))
    return joint + _conv(fusion.project_out_a, branch_a) + _conv(fusion.project_out_b, branch_b)


def _encode(net: ReFusionNet | LossGenerator, a: torch.Tensor, b: torch.Tensor):
    # Each source's embedding and encoder blocks (the two networks share this part).
    x_a, x_b = _conv(net.embed_a, a), _conv(net.embed_b, b)
    for block in net.encoder_a:
        x_a = _block(block, x_a)
    for block in net.encoder_b:
        x_b = _block(block, x_b)
    return x_a, x_b


def research_forward(net: ReFusionNet, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Fuse ``a`` and ``b`` with ``net``'s parameters, the research code's way."""
    x = _fusion(net.fusion, *_encode(net, a, b))
    for block in net.decoder:
        x = _block(block, x)
    x = _conv(net.head_out, F.leaky_relu(_conv(net.head_conv, x), 0.01))
    return torch.sigmoid(x)


def research_generator_forward(
    net: LossGenerator, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """The loss weights of ``a`` and ``b`` with ``net``'s parameters, the research code's way."""
    x = torch.cat(_encode(net, a, b), 1)
    for block in net.decoder:
        x = _block(block, x)
    x = F.prelu(_conv(net.head_conv, x), net.head_act.weight)
    return torch.softmax(_conv(net.head_out, x), dim=1)
