"""Tests of :mod:`tdfusion.nets`: shapes, exactness against the authors' network, checkpoints.

The fixture ``tests/data/refusion_msrs_reference.npz`` was produced with the authors' research
implementation of ReFusion (their ``ReFusion`` class, run unchanged in float32 on CPU with
their released checkpoints loaded by ``load_state_dict``). Inputs are crops of the MSRS test
pair ``00004N`` (from the SuperFusion repository, MIT licence): ``a`` is the infrared image,
``b`` the luma of the visible image (BT.601, ``Y = 0.299 R + 0.587 G + 0.114 B``), both
divided by 255 and stored as float32. ``*_even`` is the crop ``[200:296, 256:384]`` (96 x 128)
and ``*_odd`` the crop ``[300:345, 100:161]`` (45 x 61). ``fused_<TASK>_<crop>`` is the research
network's output for ``ReFusion_<TASK>.pth`` on the infrared (first) and visible (second)
channels.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tdfusion.errors import CheckpointError
from tdfusion.nets import (
    ChannelAttention,
    CrossAttentionFusion,
    GatedFeedForward,
    LayerNorm2d,
    LossGenerator,
    ReFusionNet,
    RestormerBlock,
    banded,
    convert_research_state_dict,
    create_model,
    list_models,
)
from tdfusion.nets.banded import band_rows, banded_forward
from tdfusion.nets.layers import _output_slices, transposed_attention

REFERENCE_FIXTURE = Path(__file__).parent / "data" / "refusion_msrs_reference.npz"
RESEARCH_TASKS = ("IVIF", "MIF", "MFIF", "MEIF")
TOLERANCE = 2e-4
TINY = {"dim": 4, "num_blocks": 1, "num_heads": 2, "ffn_expansion": 1.5}
NETS = (ReFusionNet, LossGenerator)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # The inputs here are tiny: on a busy machine with few cores, torch's worker threads wait
    # on each other far longer than they compute.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    with np.load(REFERENCE_FIXTURE, allow_pickle=False) as arrays:
        return {name: torch.from_numpy(arrays[name])[None, None] for name in arrays.files}


def research_weights(shared_data: Path, task: str) -> Path:
    path = shared_data / "weights" / "ReFusion" / f"ReFusion_{task}.pth"
    if not path.is_file():
        pytest.skip(f"the authors' checkpoint {path.name} is absent")
    return path


def pair(*shape: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return (
        torch.rand(*shape, generator=generator, dtype=dtype),
        torch.rand(*shape, generator=generator, dtype=dtype),
    )


# --- shapes, ranges, sizes ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (2, 1, 17, 23), (3, 1, 1, 9), (1, 1, 32, 5)])
def test_refusion_output_shape_and_range(shape: tuple[int, ...]) -> None:
    a, b = pair(*shape)
    fused = ReFusionNet()(a, b)
    assert fused.shape == shape
    assert fused.is_contiguous()
    assert fused.dtype == torch.float32
    assert torch.all((fused >= 0) & (fused <= 1))


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (2, 1, 17, 23), (3, 1, 1, 9)])
def test_generator_weights_are_a_softmax_over_two_channels(shape: tuple[int, ...]) -> None:
    a, b = pair(*shape)
    generator = LossGenerator()
    weights = generator(a, b)
    assert weights.shape == (shape[0], 2, *shape[2:])
    assert weights.is_contiguous()
    assert torch.all(weights >= 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(shape[0], *shape[2:]))
    w_a, w_b = generator.weights(a, b)
    assert w_a.shape == w_b.shape == shape
    torch.testing.assert_close(torch.cat([w_a, w_b], dim=1), weights)


def test_batch_items_are_independent() -> None:
    a, b = pair(3, 1, 12, 10)
    net = ReFusionNet()
    batched = net(a, b)
    single = torch.cat([net(a[i : i + 1], b[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("net_class", "expected"), [(ReFusionNet, 59_856), (LossGenerator, 44_529)]
)
def test_parameter_counts_match_the_paper_architecture(net_class: type, expected: int) -> None:
    assert sum(parameter.numel() for parameter in net_class().parameters()) == expected


def test_networks_describe_themselves() -> None:
    net = ReFusionNet(dim=8, num_heads=4)
    assert net.in_channels == 1 and net.out_channels == 1
    assert net.config == {
        "dim": 8,
        "num_blocks": 2,
        "num_heads": 4,
        "ffn_expansion": 2.0,
        "bias": False,
    }
    net.config["dim"] = 99  # a copy: the network is not changed
    assert net.config["dim"] == 8
    assert LossGenerator().out_channels == 2
    assert not any(
        name.endswith("bias") and "norm" not in name for name, _ in net.named_parameters()
    )
    assert isinstance(ReFusionNet(bias=True).embed_a.bias, nn.Parameter)


@pytest.mark.parametrize("net_class", NETS)
@pytest.mark.parametrize(
    ("a_shape", "b_shape", "a_dtype", "message"),
    [
        ((1, 8, 8), (1, 8, 8), torch.float32, "(N, 1, H, W)"),
        ((1, 2, 8, 8), (1, 2, 8, 8), torch.float32, "(N, 1, H, W)"),
        ((1, 1, 8, 8), (1, 1, 8, 9), torch.float32, "same shape"),
        ((2, 1, 8, 8), (1, 1, 8, 8), torch.float32, "same shape"),
        ((1, 1, 8, 8), (1, 1, 8, 8), torch.int64, "floating dtype"),
        ((1, 1, 8, 8), (1, 1, 8, 8), torch.float64, "floating dtype"),
        ((1, 1, 0, 8), (1, 1, 0, 8), torch.float32, "non-empty"),
    ],
)
def test_bad_inputs_are_refused_at_the_door(
    net_class: type, a_shape: tuple, b_shape: tuple, a_dtype: torch.dtype, message: str
) -> None:
    a = torch.zeros(a_shape, dtype=a_dtype)
    b = torch.zeros(b_shape)
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        net_class()(a, b)
    assert "\n" not in str(error.value)
    assert str(tuple(a_shape)) in str(error.value) or str(a_dtype) in str(error.value)


@pytest.mark.parametrize(("dim", "num_heads", "num_blocks"), [(10, 4, 1), (16, 0, 1), (8, 2, -1)])
def test_bad_widths_are_refused(dim: int, num_heads: int, num_blocks: int) -> None:
    with pytest.raises(ValueError, match="num_"):
        ReFusionNet(dim=dim, num_heads=num_heads, num_blocks=num_blocks)


# --- building blocks -----------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_normalises_each_pixel_over_channels(channels_last: bool) -> None:
    norm = LayerNorm2d(6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 6))
        norm.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    x = torch.randn(2, 6, 5, 7) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mean = x.mean(dim=1, keepdim=True)
    variance = x.var(dim=1, keepdim=True, unbiased=False)
    expected = (x - mean) / torch.sqrt(variance + 1e-5) * norm.weight.view(-1, 1, 1)
    expected = expected + norm.bias.view(-1, 1, 1)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


def naive_transposed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    # Restormer's per-head formulation on (N, C, P) tensors.
    n, channels, pixels = query.shape
    heads = temperature.shape[0]
    q, k, v = (t.reshape(n, heads, channels // heads, pixels) for t in (query, key, value))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    attention = torch.softmax(q @ k.transpose(-2, -1) * temperature, dim=-1)
    return (attention @ v).reshape(n, channels, pixels)


def test_transposed_attention_matches_the_per_head_formula() -> None:
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(2, 12, 35, generator=generator) for _ in range(3))
    temperature = torch.rand(4, 1, 1, generator=generator) * 3
    expected = naive_transposed_attention(query, key, value, temperature)
    attended = transposed_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), temperature
    )
    torch.testing.assert_close(attended.transpose(1, 2), expected, rtol=1e-5, atol=1e-6)


def test_transposed_attention_stays_in_range_in_float16() -> None:
    # Over 20k pixels the raw query-key products exceed float16's largest value (65504).
    generator = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(1, 20_000, 8, generator=generator) * 3 + 2 for _ in range(3))
    temperature = torch.ones(2, 1, 1)
    expected = transposed_attention(query, key, value, temperature)
    half = transposed_attention(query.half(), key.half(), value.half(), temperature.half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), expected, rtol=0, atol=2e-2)


@pytest.mark.parametrize(
    "block",
    [
        LayerNorm2d(8),
        ChannelAttention(8, num_heads=2),
        GatedFeedForward(8, expansion=2.0),
        RestormerBlock(8, num_heads=4),
    ],
    ids=lambda block: type(block).__name__,
)
def test_blocks_keep_shape_and_do_not_depend_on_memory_layout(block: nn.Module) -> None:
    x = torch.randn(2, 8, 9, 11)
    out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(block(x.to(memory_format=torch.channels_last)), out)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("parts", [2, 3])
def test_convolutions_by_output_slices_equal_the_whole_then_chunked(bias: bool, parts: int) -> None:
    # The blocks compute depthwise(pointwise(x)).chunk(parts) part by part; values and
    # gradients (input, weights, biases) must be those of the whole computation.
    torch.manual_seed(0)
    pointwise = nn.Conv2d(4, 6 * parts, kernel_size=1, bias=bias).double()
    depthwise = nn.Conv2d(6 * parts, 6 * parts, 3, padding=1, groups=6 * parts, bias=bias).double()
    x = torch.randn(2, 4, 7, 9, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(2, 6, 7, 9, dtype=torch.float64) for _ in range(parts)]
    leaves = [x, *pointwise.parameters(), *depthwise.parameters()]

    def gradients_of(outputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(sum((o * w).sum() for o, w in zip(outputs, weights)), leaves)

    whole = list(depthwise(pointwise(x)).chunk(parts, dim=1))
    sliced = _output_slices(pointwise, depthwise, x.to(memory_format=torch.channels_last), parts)
    for expected, actual in zip(whole, sliced):
        torch.testing.assert_close(actual, expected)
    for expected, actual in zip(gradients_of(whole), gradients_of(sliced)):
        torch.testing.assert_close(actual, expected)


def test_cross_attention_fusion_mixes_both_sources() -> None:
    fusion = CrossAttentionFusion(8, num_heads=2)
    features_a, features_b = torch.randn(1, 8, 6, 7), torch.randn(1, 8, 6, 7)
    out = fusion(features_a, features_b)
    assert out.shape == (1, 16, 6, 7)
    changed_b = fusion(features_a, features_b + 1.0)
    # Source b reaches the first half through the attention and the gate.
    assert not torch.allclose(out[:, :8], changed_b[:, :8])


# --- gradients, dtypes, functional use -----------------------------------------------------


@pytest.mark.parametrize("net_class", NETS)
def test_every_parameter_receives_a_finite_gradient(net_class: type) -> None:
    net = net_class()
    a, b = pair(2, 1, 12, 9)
    output = net(a, b)
    (output * torch.linspace(0.1, 1.0, output.numel()).view_as(output)).sum().backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert any(parameter.grad.abs().sum() > 0 for parameter in net.parameters())


@pytest.mark.parametrize("net_class", NETS)
def test_gradients_stay_finite_on_constant_images(net_class: type) -> None:
    net = net_class()
    zeros = torch.zeros(1, 1, 6, 6)
    net(zeros, zeros).sum().backward()
    assert all(torch.isfinite(parameter.grad).all() for parameter in net.parameters())


@pytest.mark.parametrize("net_class", NETS)
def test_float64_forward_and_input_gradients_match_finite_differences(net_class: type) -> None:
    net = net_class(**TINY).double()
    a, b = pair(1, 1, 3, 3, dtype=torch.float64)
    a.requires_grad_(True)
    b.requires_grad_(True)
    assert net(a, b).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x, y: net(x, y), (a, b))


def test_second_order_gradients_are_exact() -> None:
    # The meta step differentiates through a gradient step of F: check d(grad)/d(input).
    net = ReFusionNet(**TINY).double()
    a, b = pair(1, 1, 4, 4, dtype=torch.float64)
    a.requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda x: net(x, b), (a,), fast_mode=True)


@pytest.mark.parametrize("net_class", NETS)
def test_functional_call_uses_the_given_parameters(net_class: type) -> None:
    net = net_class(**TINY)
    a, b = pair(2, 1, 7, 6)
    params = {name: value.detach() * 1.1 for name, value in net.named_parameters()}
    functional = torch.func.functional_call(net, params, (a, b))
    changed = net_class(**TINY)
    changed.load_state_dict(params)
    torch.testing.assert_close(functional, changed(a, b))
    assert not torch.allclose(functional, net(a, b))


# --- banded inference ----------------------------------------------------------------------


def perturbed(net: nn.Module) -> nn.Module:
    # Fresh networks have unit layer norms and zero biases; move every parameter so that a
    # folded affine map or a forgotten bias shows.
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return net.eval()


@pytest.mark.parametrize(
    "config", [{}, {"bias": True}, TINY, {"dim": 8, "num_blocks": 0, "num_heads": 4}]
)
@pytest.mark.parametrize("shape", [(1, 1, 20, 24), (2, 1, 13, 7), (1, 1, 1, 5), (1, 1, 6, 1)])
@pytest.mark.parametrize("band_pixels", [1, 24, 10**6])
def test_banded_forward_computes_what_the_modules_compute(
    config: dict, shape: tuple[int, ...], band_pixels: int
) -> None:
    # In float64, so that only a wrong formula could exceed the tolerance. One-row bands,
    # bands that do not divide the height, and one band for the whole image.
    net = perturbed(ReFusionNet(**config)).double()
    a, b = pair(*shape, dtype=torch.float64)
    with torch.no_grad():
        expected = net(a, b)
    with torch.inference_mode():
        fused = banded_forward(net, a, b, band_pixels=band_pixels)
    assert fused.shape == expected.shape
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("config", [{}, {"bias": True}])
def test_banded_forward_in_float32_stays_within_rounding(config: dict) -> None:
    # Folding the attention into its output projection rounds differently; the perturbed weights
    # amplify it more than trained ones (1e-6 on the authors' weights).
    net = perturbed(ReFusionNet(**config))
    a, b = pair(2, 1, 20, 24)
    with torch.no_grad():
        expected = net.double()(a.double(), b.double()).float()
        plain = net.float()(a, b)
    with torch.inference_mode():
        fused = banded_forward(net, a, b, band_pixels=100)
    assert (fused - expected).abs().max() <= 4 * (plain - expected).abs().max() + 1e-6


@pytest.mark.parametrize("threads", [2, 3])
def test_banded_forward_on_threads_gives_the_same_bits_and_restores_the_thread_count(
    threads: int,
) -> None:
    # Bands are spread over threads, their sums added in band order: the result cannot depend
    # on which thread computed what.
    net = perturbed(ReFusionNet(dim=8, num_blocks=2, num_heads=4))
    a, b = pair(2, 1, 23, 9)
    with torch.inference_mode():
        alone = banded_forward(net, a, b, band_pixels=18, threads=1)
        spread = banded_forward(net, a, b, band_pixels=18, threads=threads)
    assert torch.equal(alone, spread)
    assert torch.get_num_threads() == 1  # as the autouse fixture set it


def test_inference_mode_on_the_cpu_runs_banded_and_everything_else_the_modules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []

    def spy(net, a, b, **kwargs):
        calls.append(a.shape)
        return banded_forward(net, a, b, **kwargs)

    monkeypatch.setattr("tdfusion.nets.refusion.banded_forward", spy)
    net = ReFusionNet(**TINY)
    a, b = pair(1, 1, 6, 8)
    with torch.inference_mode():
        net(a, b)
    assert len(calls) == 1
    net(a, b).sum().backward()  # autograd
    with torch.no_grad():
        net(a, b)
    net.banded = False
    with torch.inference_mode():
        net(a, b)
    assert len(calls) == 1


def test_banded_forward_refuses_bad_inputs_like_the_network() -> None:
    with pytest.raises(ValueError, match="ReFusionNet expects a and b of the same shape"):
        banded_forward(ReFusionNet(**TINY), torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5))


@pytest.mark.parametrize(
    ("height", "width", "band_pixels", "rows"),
    [(480, 640, 8192, 12), (5, 640, 8192, 5), (100, 10**5, 8192, 1), (7, 0, 10, 7)],
)
def test_band_rows_stay_within_the_image(height, width, band_pixels, rows) -> None:
    assert band_rows(height, width, band_pixels) == rows


def test_bands_cover_every_row_once_with_one_row_of_halo() -> None:
    bands = list(banded._bands(10, 4))
    assert bands == [(0, 4, 0, 5), (4, 8, 3, 9), (8, 10, 7, 10)]


# --- exactness against the authors' network ------------------------------------------------


@pytest.mark.parametrize("crop", ["even", "odd"])
def test_matches_the_authors_network_on_real_msrs_images(
    shared_data: Path, reference: dict[str, torch.Tensor], crop: str
) -> None:
    net = ReFusionNet.from_pretrained(research_weights(shared_data, "IVIF"))
    with torch.no_grad():
        fused = net(reference[f"a_{crop}"], reference[f"b_{crop}"])
    difference = (fused - reference[f"fused_IVIF_{crop}"]).abs().max().item()
    assert difference <= TOLERANCE
    with torch.inference_mode():  # banded
        fused = net(reference[f"a_{crop}"], reference[f"b_{crop}"])
    assert (fused - reference[f"fused_IVIF_{crop}"]).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("task", RESEARCH_TASKS)
def test_all_research_checkpoints_load_and_reproduce_their_output(
    shared_data: Path, reference: dict[str, torch.Tensor], task: str
) -> None:
    net = ReFusionNet.from_pretrained(research_weights(shared_data, task), map_location="cpu")
    assert net.config == ReFusionNet().config
    assert not net.training
    with torch.no_grad():
        fused = net(reference["a_odd"], reference["b_odd"])
    assert (fused - reference[f"fused_{task}_odd"]).abs().max().item() <= TOLERANCE


def test_research_checkpoint_loads_through_the_factory(
    shared_data: Path, reference: dict[str, torch.Tensor]
) -> None:
    path = research_weights(shared_data, "IVIF")
    net = create_model("refusion", pretrained=path)
    with torch.no_grad():
        fused = net(reference["a_odd"], reference["b_odd"])
    assert (fused - reference["fused_IVIF_odd"]).abs().max().item() <= TOLERANCE


# --- research state-dict conversion --------------------------------------------------------

#: Our names -> the research code's names for the loss generator (its ``LPN`` class).
_GENERATOR_TO_RESEARCH = {
    "embed_a": "patch_embed1",
    "embed_b": "patch_embed2",
    "encoder_a": "encoder1",
    "encoder_b": "encoder2",
    "decoder": "encoder3",
    "head_conv": "out1",
    "head_act": "out2",
    "head_out": "out3",
}


def research_style(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a loss-generator state dict the way the research code (under DataParallel) did."""
    research: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        top, rest = key.split(".", 1)
        name = f"{_GENERATOR_TO_RESEARCH[top]}.{rest}"
        name = name.replace(".attn_norm.", ".norm1.body.").replace(".ffn_norm.", ".norm2.body.")
        research[f"module.{name}"] = value
        if value.dim() == 4:
            owner, leaf = name.rsplit(".", 1)
            research[f"module.{owner}.conv.{leaf}"] = value.clone()
    return research


def test_research_loss_generator_checkpoint_converts(tmp_path: Path) -> None:
    generator = LossGenerator()
    research = research_style(generator.state_dict())
    assert "module.encoder3.1.norm2.body.weight" in research
    assert "module.out1.conv.weight" in research
    converted = convert_research_state_dict(research)
    assert converted.keys() == generator.state_dict().keys()
    path = tmp_path / "lpn.pth"
    torch.save(research, path)
    loaded = LossGenerator.from_pretrained(path)
    a, b = pair(1, 1, 9, 10)
    torch.testing.assert_close(loaded(a, b), generator(a, b))


def test_wrapper_prefixes_are_dropped(tmp_path: Path) -> None:
    net = ReFusionNet(**TINY)
    wrapped = {f"module._orig_mod.{key}": value for key, value in net.state_dict().items()}
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped, path)
    a, b = pair(1, 1, 6, 7)
    torch.testing.assert_close(ReFusionNet.from_pretrained(path)(a, b), net(a, b))


def test_research_duplicates_that_disagree_are_refused(tmp_path: Path) -> None:
    research = research_style(LossGenerator().state_dict())
    research["module.out3.conv.weight"] = research["module.out3.conv.weight"] + 1.0
    with pytest.raises(CheckpointError, match=r"out3\.weight and out3\.conv\.weight"):
        convert_research_state_dict(research)
    path = tmp_path / "tampered.pth"
    torch.save(research, path)
    with pytest.raises(CheckpointError, match=r"tampered\.pth"):
        LossGenerator.from_pretrained(path)


def test_research_keys_map_onto_the_fusion_network(shared_data: Path) -> None:
    research = torch.load(
        research_weights(shared_data, "IVIF"), map_location="cpu", weights_only=True
    )
    converted = convert_research_state_dict(research)
    assert converted.keys() == ReFusionNet().state_dict().keys()
    assert len(research) == 140 and len(converted) == 86  # 54 convolutions listed twice
    torch.testing.assert_close(converted["fusion.qkv_b.weight"], research["FM.qkv2.conv.weight"])
    torch.testing.assert_close(
        converted["encoder_a.1.attn_norm.bias"], research["encoder1.1.norm1.body.bias"]
    )


# --- our own checkpoints -------------------------------------------------------------------

WIDE = {"dim": 8, "num_blocks": 1, "num_heads": 2, "ffn_expansion": 1.5, "bias": True}


@pytest.mark.parametrize("net_class", NETS)
def test_save_and_load_round_trip_keeps_non_default_widths(net_class: type, tmp_path: Path) -> None:
    net = net_class(**WIDE)
    path = net.save_pretrained(tmp_path / "nested" / "net.pth")
    assert path == tmp_path / "nested" / "net.pth"
    assert [entry.name for entry in path.parent.iterdir()] == ["net.pth"]  # no temp file left
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "tdfusion.nets" and payload["version"] == 1
    assert payload["arch"] == net_class.arch and payload["config"] == net.config
    loaded = net_class.from_pretrained(path)
    assert loaded.config == net.config
    a, b = pair(1, 1, 11, 13)
    torch.testing.assert_close(loaded(a, b), net(a, b))


@pytest.mark.parametrize("net_class", NETS)
def test_plain_state_dict_rebuilds_its_widths(net_class: type, tmp_path: Path) -> None:
    net = net_class(**WIDE)
    path = tmp_path / "plain.pth"
    torch.save(net.state_dict(), path)
    loaded = net_class.from_pretrained(path)
    assert loaded.config == net.config
    a, b = pair(1, 1, 6, 6)
    torch.testing.assert_close(loaded(a, b), net(a, b))


def test_trainer_checkpoint_gives_each_network_its_entry(tmp_path: Path) -> None:
    fusion, generator = ReFusionNet(**WIDE), LossGenerator(dim=8, num_heads=4)
    path = tmp_path / "trainer.pth"
    torch.save(
        {
            "format": "tdfusion.trainer",
            "models": {
                "fusion_model": fusion.state_dict(),
                "loss_generator": generator.state_dict(),
                "task": {"weight": torch.zeros(2)},
            },
            "model_configs": {
                "fusion_model": {"arch": "ReFusionNet", "config": fusion.config},
                "loss_generator": None,
            },
            "epoch": 3,
        },
        path,
    )
    a, b = pair(1, 1, 7, 9)
    loaded_fusion = ReFusionNet.from_pretrained(path)
    assert loaded_fusion.config == fusion.config
    torch.testing.assert_close(loaded_fusion(a, b), fusion(a, b))
    loaded_generator = LossGenerator.from_pretrained(path)
    assert loaded_generator.config == generator.config
    torch.testing.assert_close(loaded_generator(a, b), generator(a, b))


def test_trainer_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "trainer.pth"
    torch.save(
        {
            "format": "tdfusion.trainer",
            "models": {"fusion_model": {"weight": torch.zeros(1)}},
            "model_configs": {"fusion_model": {"arch": "my_unet", "config": {}}},
        },
        path,
    )
    with pytest.raises(CheckpointError, match="'my_unet'"):
        ReFusionNet.from_pretrained(path)
    with pytest.raises(CheckpointError, match=r"no models\['loss_generator'\].*fusion_model"):
        LossGenerator.from_pretrained(path)


def test_file_of_the_other_network_is_refused(tmp_path: Path) -> None:
    path = LossGenerator(**TINY).save_pretrained(tmp_path / "generator.pth")
    with pytest.raises(CheckpointError, match="'loss_generator' network, not a 'refusion'"):
        ReFusionNet.from_pretrained(path)


def broken_state_dict(kind: str) -> tuple[dict[str, torch.Tensor], str]:
    state_dict = ReFusionNet().state_dict()
    if kind == "missing":
        del state_dict["fusion.gate_in.weight"]
        return state_dict, "missing keys: fusion.gate_in.weight"
    if kind == "unexpected":
        state_dict["fusion.extra.weight"] = torch.zeros(3)
        return state_dict, "unexpected keys: fusion.extra.weight"
    state_dict["head_out.weight"] = torch.zeros(1, 16, 5, 5)
    return state_dict, "head_out.weight (1, 16, 5, 5) in the file vs (1, 16, 3, 3) in the model"


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape"])
def test_mismatched_state_dict_is_refused_with_the_keys_named(kind: str, tmp_path: Path) -> None:
    state_dict, expected = broken_state_dict(kind)
    path = tmp_path / f"{kind}.pth"
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError) as error:
        ReFusionNet.from_pretrained(path)
    message = str(error.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_non_strict_load_warns_but_shape_mismatch_still_fails(tmp_path: Path) -> None:
    state_dict, _ = broken_state_dict("missing")
    path = tmp_path / "missing.pth"
    torch.save(state_dict, path)
    with pytest.warns(UserWarning, match="fusion.gate_in.weight"):
        ReFusionNet.from_pretrained(path, strict=False)
    state_dict, _ = broken_state_dict("shape")
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        ReFusionNet.from_pretrained(path, strict=False)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"not a torch file", "cannot read checkpoint"),
        ({"format": "someone.else", "state_dict": {}}, "unknown format 'someone.else'"),
        ([torch.zeros(2)], "holds a list"),
        ({"weights": {"x": torch.zeros(1)}}, "not tensors: weights"),
        ({"format": "tdfusion.nets", "version": 2, "arch": "refusion"}, "version 2"),
    ],
)
def test_unknown_files_are_refused(payload: object, message: str, tmp_path: Path) -> None:
    path = tmp_path / "odd.pth"
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        ReFusionNet.from_pretrained(path)


def test_missing_file_lists_the_places_looked_at(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TDFUSION_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as error:
        ReFusionNet.from_pretrained("ReFusion_nowhere.pth")
    message = str(error.value)
    assert str(tmp_path / "home" / "weights" / "ReFusion_nowhere.pth") in message
    assert str(Path.home() / ".cache" / "tdfusion" / "weights") in message
    assert "downloads nothing" in message


def test_weights_folder_of_tdfusion_home_is_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TDFUSION_HOME", str(tmp_path))
    net = ReFusionNet(**TINY)
    net.save_pretrained(tmp_path / "weights" / "mine.pth")
    loaded = ReFusionNet.from_pretrained("some/other/folder/mine.pth")
    assert loaded.config == net.config


# --- registry ------------------------------------------------------------------------------


def test_registry_lists_and_builds_both_networks(tmp_path: Path) -> None:
    assert {"refusion", "loss_generator"} <= set(list_models())
    assert list_models("refu*") == ["refusion"]
    assert isinstance(create_model("refusion"), ReFusionNet)
    generator = create_model("loss_generator", dim=8, num_heads=4)
    assert isinstance(generator, LossGenerator) and generator.config["dim"] == 8
    for name in ("refusion", "loss_generator"):
        assert create_model(name, **TINY).arch == name


def test_factory_loads_weights_with_and_without_explicit_widths(tmp_path: Path) -> None:
    net = ReFusionNet(**TINY)
    path = net.save_pretrained(tmp_path / "tiny.pth")
    a, b = pair(1, 1, 5, 6)
    torch.testing.assert_close(create_model("refusion", pretrained=path)(a, b), net(a, b))
    torch.testing.assert_close(create_model("refusion", pretrained=path, **TINY)(a, b), net(a, b))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        create_model("refusion", pretrained=path, dim=8, num_heads=2)


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'unet'.*loss_generator, refusion"):
        create_model("unet")


class RunsCode:
    """Pickles as a call of ``exec``: what a checkpoint that runs code looks like."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


@pytest.mark.parametrize("net", [ReFusionNet, LossGenerator])
def test_checkpoint_errors_give_no_unsafe_advice_and_no_escapes(tmp_path: Path, net) -> None:
    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": RunsCode(marker)}, evil)
    text = tmp_path / "notes.pt"
    text.write_text("hello world\n")
    for path, reason in ((evil, "refers to .*exec"), (text, "not a file written by torch.save")):
        with pytest.raises(CheckpointError, match=reason) as caught:
            net.from_pretrained(path)
        message = str(caught.value)
        assert str(path) in message and "\n" not in message and "\x1b" not in message
        for advice in ("weights_only=False", "safe_globals", "allowlist", "trust"):
            assert advice not in message
    assert not marker.exists()


def test_describe_load_error_keeps_plain_reasons() -> None:
    from tdfusion.errors import describe_load_error

    error = RuntimeError(
        "PytorchStreamReader failed reading zip archive: failed finding central directory"
    )
    assert describe_load_error(error) == str(error)
    assert describe_load_error(EOFError()) == "EOFError"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_non_finite_values_are_refused(tmp_path: Path, bad: float) -> None:
    model = ReFusionNet(dim=8)
    with torch.no_grad():
        next(model.parameters()).view(-1)[3] = bad
    path = model.save_pretrained(tmp_path / "poisoned.pt")
    with pytest.raises(CheckpointError, match=r"poisoned\.pt holds NaN or infinite values \(1 of"):
        ReFusionNet.from_pretrained(path)
