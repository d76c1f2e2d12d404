"""Tests of :mod:`tdfusion.nets` at its edges: half precision, dtypes, loading, torch.func.

Banded inference in half precision, the dtype check of the forward passes, ``create_model``'s
boolean ``pretrained``, the architecture read back from plain state dicts, and the networks
under :func:`torch.func.vmap` and :func:`torch.func.grad`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_nets import NETS, TINY, _one_torch_thread  # noqa: F401 (an autouse fixture)
from torch import nn
from torch.func import functional_call, grad, vmap

from tdfusion.nets import ReFusionNet, create_model
from tdfusion.nets.banded import _AttentionStatistics, banded_forward
from tdfusion.nets.bundled import DEFAULT_FUSION_WEIGHTS, default_pretrained
from tdfusion.nets.checkpointing import checkpointing_applies
from tdfusion.nets.pretrained import infer_config

HALF_DTYPES = (torch.float16, torch.bfloat16)


def pair(*shape: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return (
        torch.rand(*shape, generator=generator, dtype=dtype),
        torch.rand(*shape, generator=generator, dtype=dtype),
    )


def perturbed(net: nn.Module, seed: int = 3) -> nn.Module:
    # Fresh networks have unit layer norms and zero biases: move every parameter.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return net.eval()


# --- banded inference in half precision ----------------------------------------------------


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_attention_statistics_of_half_bands_are_summed_in_float32(dtype: torch.dtype) -> None:
    # 4096 pixels of value 8: each sum is 262144, beyond float16's largest number (65504).
    query = torch.full((1, 64, 64, 4), 8.0, dtype=dtype)
    product, query_squares, key_squares = _AttentionStatistics.of_band(query, query)
    for total in (product, query_squares, key_squares):
        assert total.dtype == torch.float32
        torch.testing.assert_close(total, torch.full_like(total, 64.0 * 4096))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_attention_mixing_is_handed_back_in_the_network_dtype(dtype: torch.dtype) -> None:
    net = perturbed(ReFusionNet(**TINY)).to(dtype)
    query = torch.rand(1, 6, 5, 4).to(dtype)
    statistics = _AttentionStatistics([_AttentionStatistics.of_band(query, query)])
    attention = net.encoder_a[0].attn
    mixing = statistics.mixing(attention.temperature, attention.project_out)
    assert mixing.dtype == dtype and mixing.shape == (1, 4, 4)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_banded_forward_in_half_precision_stays_finite_and_close(dtype: torch.dtype) -> None:
    # Queries and keys made ten times larger: their sums over a 32 x 32 image overflowed
    # float16 (an all-NaN image) while they were accumulated in the network's dtype.
    net = perturbed(ReFusionNet(**TINY))
    with torch.no_grad():
        for block in (*net.encoder_a, *net.encoder_b, *net.decoder):
            block.attn.qkv.weight.mul_(10)
    a, b = pair(1, 1, 32, 32)
    with torch.no_grad():
        expected = net.double()(a.double(), b.double()).float()
        net.to(dtype)
        plain = net(a.to(dtype), b.to(dtype)).float()
    with torch.inference_mode():
        fused = banded_forward(net, a.to(dtype), b.to(dtype)).float()
    assert fused.isfinite().all()
    # float16 keeps ~3 decimal digits, bfloat16 ~2; the banded path does no worse than the
    # modules (measured: 5.5e-3 vs 3.9e-3 in float16, 2.8e-2 vs 4.8e-2 in bfloat16).
    assert (fused - expected).abs().max() <= 2 * (plain - expected).abs().max() + 2e-3


# --- dtypes of the inputs ------------------------------------------------------------------


@pytest.mark.parametrize("net_class", NETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inference", [False, True])
def test_sources_of_another_dtype_than_the_network_are_refused(
    net_class: type, dtype: torch.dtype, inference: bool
) -> None:
    # Plain forward, and ReFusionNet's banded one under inference mode.
    net = net_class(**TINY)
    a, b = pair(1, 1, 6, 7, dtype=dtype)
    with (
        torch.inference_mode(inference),
        pytest.raises(ValueError, match="has torch.float32 parameters") as error,
    ):
        net(a, b)
    assert str(dtype) in str(error.value) and "\n" not in str(error.value)


def test_banded_forward_refuses_another_dtype_too() -> None:
    a, b = pair(1, 1, 6, 7, dtype=torch.float64)
    with torch.inference_mode(), pytest.raises(ValueError, match="torch.float64"):
        banded_forward(ReFusionNet(**TINY), a, b)


@pytest.mark.parametrize("net_class", NETS)
def test_autocast_may_mix_dtypes(net_class: type) -> None:
    net = net_class(**TINY)
    a, b = pair(1, 1, 6, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(a.bfloat16(), b.bfloat16())
    assert out.shape[-2:] == (6, 7) and out.isfinite().all()


@pytest.mark.parametrize("net_class", NETS)
def test_a_network_of_the_sources_dtype_runs(net_class: type) -> None:
    net = net_class(**TINY).double()
    a, b = pair(1, 1, 6, 7, dtype=torch.float64)
    assert net(a, b).dtype == torch.float64


# --- create_model(pretrained=bool) ---------------------------------------------------------


def test_pretrained_false_builds_fresh_weights_in_training_mode() -> None:
    torch.manual_seed(0)
    net = create_model("refusion", pretrained=False, **TINY)
    assert isinstance(net, ReFusionNet) and net.training and net.config["dim"] == 4


def test_pretrained_true_loads_the_bundled_weights_in_eval_mode() -> None:
    net = create_model("refusion", pretrained=True)
    bundled = ReFusionNet.from_pretrained(DEFAULT_FUSION_WEIGHTS)
    assert not net.training and net.config == bundled.config
    for key, value in bundled.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key
    with_widths = create_model("refusion", pretrained=True, **bundled.config)
    assert not with_widths.training


def test_pretrained_true_without_bundled_weights_names_the_architecture() -> None:
    with pytest.raises(ValueError, match="'loss_generator' has no bundled weights") as error:
        create_model("loss_generator", pretrained=True)
    assert "\n" not in str(error.value)


def test_default_pretrained_names_the_weights_of_each_architecture() -> None:
    assert default_pretrained("refusion") == DEFAULT_FUSION_WEIGHTS
    assert default_pretrained("loss_generator") is None


@pytest.mark.parametrize("net_class", NETS)
def test_loaded_networks_are_in_eval_mode_with_or_without_widths(
    net_class: type, tmp_path: Path
) -> None:
    path = net_class(**TINY).save_pretrained(tmp_path / "net.pth")
    without = create_model(net_class.arch, pretrained=path)
    with_widths = create_model(net_class.arch, pretrained=str(path), **TINY)
    assert not without.training and not with_widths.training


# --- architecture inferred from plain state dicts ------------------------------------------


@pytest.mark.parametrize("net_class", NETS)
@pytest.mark.parametrize(
    "config",
    [
        {"dim": 16, "ffn_expansion": 2.66},  # decoder 85 hidden channels, encoders 42
        {"dim": 8, "num_blocks": 0, "num_heads": 4},
        {"dim": 12, "num_blocks": 0, "num_heads": 3, "bias": True},
        {"dim": 6, "num_blocks": 1, "num_heads": 3, "ffn_expansion": 1.7},
    ],
)
def test_plain_state_dict_round_trips(net_class: type, config: dict, tmp_path: Path) -> None:
    net = perturbed(net_class(**config))
    path = tmp_path / "plain.pth"
    torch.save(net.state_dict(), path)
    loaded = net_class.from_pretrained(path)
    for key in ("dim", "num_blocks", "bias"):
        assert loaded.config[key] == net.config[key]
    a, b = pair(1, 1, 9, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(a, b), net(a, b), rtol=0, atol=0)


def test_inferred_expansion_fits_every_stage_and_keeps_exact_ratios() -> None:
    config = infer_config(ReFusionNet(dim=16, ffn_expansion=2.66).state_dict())
    assert int(16 * config["ffn_expansion"]) == 42 and int(32 * config["ffn_expansion"]) == 85
    assert infer_config(ReFusionNet(dim=8, ffn_expansion=1.5).state_dict())["ffn_expansion"] == 1.5


def test_heads_are_read_from_the_fusion_block_without_encoder_blocks() -> None:
    config = infer_config(ReFusionNet(dim=8, num_blocks=0, num_heads=2).state_dict())
    assert config["num_blocks"] == 0 and config["num_heads"] == 2


# --- torch.func ----------------------------------------------------------------------------


@pytest.mark.parametrize("net_class", NETS)
def test_vmap_over_a_batch_gives_the_batched_forward(net_class: type) -> None:
    net = perturbed(net_class(**TINY))
    a, b = pair(3, 1, 7, 9)
    mapped = vmap(lambda x, y: net(x[None], y[None])[0])(a, b)
    torch.testing.assert_close(mapped, net(a, b))


@pytest.mark.parametrize("net_class", NETS)
def test_func_grad_with_grad_checkpointing_gives_the_plain_gradient(net_class: type) -> None:
    net = perturbed(net_class(**TINY))
    a, b = pair(2, 1, 7, 9)
    params = {name: value.detach() for name, value in net.named_parameters()}

    def loss(substitutes: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(net, substitutes, (a, b)).square().mean()

    plain = grad(loss)(params)
    net.set_grad_checkpointing(True)
    checkpointed = grad(loss)(params)
    for name, value in plain.items():
        torch.testing.assert_close(checkpointed[name], value, msg=name)


def test_no_checkpoint_inside_a_torch_func_transform() -> None:
    seen = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        seen.append(checkpointing_applies())
        return x.square().sum()

    grad(probe)(torch.ones(3))
    assert seen == [False] and checkpointing_applies()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("net_class", NETS)
def test_torch_compile_traces_the_networks_in_one_graph(net_class, checkpointing: bool) -> None:
    """The torch.func and inference-mode checks must not break the compiled graph."""
    import torch._dynamo

    net = net_class(**TINY)
    if checkpointing:
        net.set_grad_checkpointing()
    a, b = pair(1, 1, 16, 16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(a, b)
    assert explained.graph_break_count == 0, explained.break_reasons
