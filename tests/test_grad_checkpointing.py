"""Gradient checkpointing of ReFusionNet and LossGenerator: same results, fewer activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import tdfusion.nets.checkpointing as checkpointing
from tdfusion import LearnableFusionLoss, MetaFusionTrainer
from tdfusion.cli import build_parser
from tdfusion.nets import LossGenerator, ReFusionNet
from tdfusion.recipes import RECIPES, build_trainer

NETWORKS = {
    "ReFusionNet": lambda: ReFusionNet(dim=8, num_blocks=2, num_heads=2),
    "LossGenerator": lambda: LossGenerator(dim=8, num_blocks=2, num_heads=2),
}


def sources(seed: int, n: int = 2, size: tuple[int, int] = (12, 14)):
    generator = torch.Generator().manual_seed(seed)
    shape = (n, 1, *size)
    a = torch.rand(shape, generator=generator, dtype=torch.float64)
    return a, torch.rand(shape, generator=generator, dtype=torch.float64)


def perturbed(network: torch.nn.Module, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Parameters different from the network's own: stand-ins for the inner step's ``F'``."""
    generator = torch.Generator().manual_seed(5)
    return {
        name: p.detach() + scale * torch.randn(p.shape, generator=generator, dtype=p.dtype)
        for name, p in network.named_parameters()
    }


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_substituted_parameters_get_the_same_first_and_second_derivatives(name):
    torch.manual_seed(0)
    network = NETWORKS[name]().double()
    a, b = sources(1)
    results = []
    for enabled in (False, True):
        network.set_grad_checkpointing(enabled)
        leaves = {n: p.clone().requires_grad_(True) for n, p in perturbed(network).items()}
        output = functional_call(network, leaves, (a, b))
        loss = (
            output * torch.linspace(0, 1, output.numel(), dtype=output.dtype).view_as(output)
        ).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        # A second-order term, as backprop through the inner step takes it.
        curvature = torch.autograd.grad(sum(g.square().sum() for g in grads), list(leaves.values()))
        results.append((output.detach(), [g.detach() for g in grads], curvature))
    (out0, grads0, curv0), (out1, grads1, curv1) = results
    assert torch.equal(out0, out1)
    for plain, checkpointed in zip(grads0 + list(curv0), grads1 + list(curv1)):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-12, atol=1e-15)


def saved_elements(network: torch.nn.Module, a: torch.Tensor, b: torch.Tensor) -> int:
    """How many tensor elements the graph of one forward keeps for its backward pass."""
    count = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        network(a, b).sum().backward()
    return count


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_checkpointing_keeps_a_fraction_of_the_activations(name):
    network = NETWORKS[name]()
    a, b = (x.float() for x in sources(2, size=(32, 32)))
    plain = saved_elements(network, a, b)
    network.set_grad_checkpointing()
    kept = saved_elements(network, a, b)
    # The checkpoints' own saves (block inputs and parameters) are counted; the activations
    # inside the blocks are not kept until the backward pass recomputes them.
    assert kept < 0.4 * plain, (kept, plain)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script:FutureWarning")
def test_no_checkpoint_is_taken_without_a_graph(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint called without a graph")

    monkeypatch.setattr(checkpointing, "checkpoint", refuse)
    network = ReFusionNet(dim=8, num_blocks=1, num_heads=2)
    network.set_grad_checkpointing()
    a, b = (x.float() for x in sources(3))
    with torch.no_grad():
        network(a, b)
    with torch.inference_mode():
        network(a, b)
    # Forward-mode tangents under no_grad, as the forward-mode hypergradient computes them.
    params = dict(network.named_parameters())
    direction = {n: torch.ones_like(p) for n, p in params.items()}
    with torch.no_grad():
        _, tangent = torch.func.jvp(
            lambda values: functional_call(network, values, (a, b)), (params,), (direction,)
        )
    assert torch.isfinite(tangent).all()
    with pytest.raises(AssertionError, match="without a graph"):  # and it is used with one
        network(a.requires_grad_(True), b)


@pytest.mark.parametrize("method", ["forward", "backprop"])
def test_the_hypergradient_and_the_fusion_step_are_unchanged(method):
    def run(enabled: bool):
        torch.manual_seed(0)
        fusion = ReFusionNet(dim=8, num_blocks=1, num_heads=2).double()
        generator = LossGenerator(dim=8, num_blocks=1, num_heads=2).double()
        fusion.set_grad_checkpointing(enabled)
        generator.set_grad_checkpointing(enabled)
        trainer = MetaFusionTrainer(
            fusion,
            lambda fused, target: F.mse_loss(fused, target),
            generator,
            LearnableFusionLoss(alpha=0.5),
            inner_lr=0.3,
            hypergradient_method=method,
            fusion_crop=(8, 10),
            device="cpu",
        )
        a, b = sources(4)
        c, d = sources(5)
        trainer.generator.manual_seed(7)
        trainer.meta_generator.manual_seed(7)
        hypergradient = trainer.hypergradient((a, b, a), (c, d, c))
        stats = trainer.fusion_step((a, b, a))
        return hypergradient, stats, dict(fusion.named_parameters())

    (hyper0, stats0, fused0), (hyper1, stats1, fused1) = run(False), run(True)
    assert max(h.abs().max() for h in hyper0.values()) > 0
    for name in hyper0:
        torch.testing.assert_close(hyper1[name], hyper0[name], rtol=1e-10, atol=1e-15)
    assert stats1["fusion_loss"] == pytest.approx(stats0["fusion_loss"], rel=1e-12)
    for name in fused0:
        torch.testing.assert_close(fused1[name], fused0[name], rtol=1e-10, atol=1e-14)


def test_the_recipe_and_the_command_line_turn_it_on():
    args = build_parser().parse_args(
        ["train", "--recipe", "msrs-segmentation", "--grad-checkpointing"]
    )
    assert args.grad_checkpointing is True
    assert (
        build_parser().parse_args(["train", "--recipe", "msrs-segmentation"]).grad_checkpointing
        is None
    )
    recipe = RECIPES["msrs-segmentation"].replace(grad_checkpointing=True, task_size=(32, 32))
    trainer = build_trainer(recipe, device="cpu")
    assert trainer.fusion_model.grad_checkpointing and trainer.loss_generator.grad_checkpointing
    assert not build_trainer(
        RECIPES["roadscene-pretrain"], device="cpu"
    ).fusion_model.grad_checkpointing
