"""MetaFusionTrainer with networks that have modes, random layers or fail late: a frozen task
network in eval mode, dropout in F, batch norm in G, T failing after F's sequential update."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from test_trainer import TinyFusion, TinyGenerator, TinySegmentation, make_batch, make_trainer
from torch import nn

from tdfusion import MetaFusionTrainer
from tdfusion.errors import NonFiniteLossError
from tdfusion.trainer.meta import call_functionally


class DropoutFusion(TinyFusion):
    """TinyFusion with channel dropout between its two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout2d(0.5)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        hidden = self.drop(torch.tanh(self.conv1(torch.cat([a, b], 1))))
        return torch.sigmoid(self.conv2(hidden))


class BatchNormGenerator(TinyGenerator):
    """TinyGenerator with a batch norm: its output depends on the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.norm(self.conv1(torch.cat([a, b], 1))))
        return self.conv2(hidden).softmax(dim=1)


def test_forward_and_backprop_hypergradients_agree_with_dropout_in_the_fusion_network():
    """The forward method runs F again: it must draw the dropout masks the inner step drew."""
    torch.manual_seed(0)
    fusion, generator = DropoutFusion().double(), TinyGenerator().double()
    task = TinySegmentation().double()
    results = {}
    for method in ("forward", "backprop"):
        trainer = MetaFusionTrainer(
            copy.deepcopy(fusion),
            copy.deepcopy(task),
            copy.deepcopy(generator),
            inner_lr=0.3,
            hypergradient_method=method,
            device="cpu",
        )
        torch.manual_seed(123)  # the same masks for both methods' inner steps
        results[method] = trainer.hypergradient(make_batch(1), make_batch(2))
    largest = max(float(g.abs().max()) for g in results["backprop"].values())
    assert largest > 0
    for name, expected in results["backprop"].items():
        torch.testing.assert_close(results["forward"][name], expected, rtol=0, atol=1e-12 * largest)


def test_replaying_the_masks_leaves_the_global_random_state_as_the_inner_step_left_it():
    """The forward method's replays happen on a side branch of the random stream: afterwards
    the stream is where the backprop method (which replays nothing) leaves it."""
    states = {}
    for method in ("forward", "backprop"):
        torch.manual_seed(0)
        trainer = MetaFusionTrainer(
            DropoutFusion().double(),
            TinySegmentation().double(),
            TinyGenerator().double(),
            hypergradient_method=method,
            device="cpu",
        )
        torch.manual_seed(5)
        trainer.hypergradient(make_batch(1), make_batch(2))
        states[method] = torch.get_rng_state()
    assert torch.equal(states["forward"], states["backprop"])


def test_a_frozen_task_network_keeps_its_mode_and_its_statistics():
    """A fixed task (no trainable parameter) in eval mode is used in eval mode, and neither the
    meta step nor the hypergradient touches its running statistics."""
    torch.manual_seed(0)
    task = TinySegmentation().double()
    task.requires_grad_(False)
    with torch.no_grad():  # pretrained statistics, far from a batch's
        task.norm.running_mean.fill_(0.5)
        task.norm.running_var.fill_(4.0)
    task.eval()
    trainer = make_trainer("callable")
    trainer = MetaFusionTrainer(
        trainer.fusion_model, task, trainer.loss_generator, inner_lr=1e-12, device="cpu"
    )
    meta_train, meta_test = make_batch(1), make_batch(2)
    buffers = {name: value.clone() for name, value in task.named_buffers()}
    trainer.hypergradient(meta_train, meta_test)
    stats = trainer.meta_step(meta_train, meta_test)
    assert not task.training
    for name, value in task.named_buffers():
        assert torch.equal(value, buffers[name]), name
    # with an inner step of ~0, the outer loss is T (in eval mode) on F's output
    with torch.no_grad():
        expected = task(trainer.fusion_model(*meta_test[:2]), meta_test[2])
    assert stats["task_loss"] == pytest.approx(float(expected), rel=1e-9)


def test_the_fusion_step_weights_come_from_the_generator_in_the_mode_it_was_learned_in():
    torch.manual_seed(0)
    generator = BatchNormGenerator().double()
    trainer = make_trainer("module")
    trainer = MetaFusionTrainer(
        trainer.fusion_model, trainer.task_loss, generator, inner_lr=0.3, device="cpu"
    )
    trainer.meta_step(make_batch(1), make_batch(2))
    assert int(generator.norm.num_batches_tracked) == 0  # the meta step left it alone
    batch = make_batch(3)
    with torch.no_grad():
        learned = call_functionally(generator.train(), batch[:2])[:, 0].mean()
        unused_statistics = call_functionally(generator.eval(), batch[:2])[:, 0].mean()
    assert abs(float(learned) - float(unused_statistics)) > 1e-3  # the modes differ here
    stats = trainer.fusion_step(batch)
    assert stats["weight_a_mean"] == pytest.approx(float(learned), rel=1e-12)
    assert int(generator.norm.num_batches_tracked) == 1  # its statistics follow the batches


class LateFailingTask(TinySegmentation):
    """A finite loss whose gradient is infinite (a square root at 0)."""

    def forward(self, fused: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        weight = self.head.weight
        return super().forward(fused, masks) + torch.sqrt((weight - weight.detach()).abs().sum())


@pytest.mark.parametrize("rule", ["raise", "skip"])
def test_a_sequential_step_whose_task_update_fails_leaves_the_fusion_network_as_it_was(rule):
    torch.manual_seed(0)
    trainer = MetaFusionTrainer(
        TinyFusion().double(),
        LateFailingTask().double(),
        TinyGenerator().double(),
        fusion_step_order="sequential",
        on_nonfinite=rule,
        device="cpu",
    )
    before = copy.deepcopy(trainer.fusion_model.state_dict())
    optimizer_before = copy.deepcopy(trainer.fusion_optimizer.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if rule == "raise":
            with pytest.raises(NonFiniteLossError):
                trainer.fusion_step(make_batch(3))
        else:
            assert trainer.fusion_step(make_batch(3))["skipped"] == 1.0
    for name, value in trainer.fusion_model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert trainer.fusion_optimizer.state_dict() == optimizer_before


def test_a_sequential_step_that_succeeds_still_updates_both_networks():
    trainer = make_trainer("module", fusion_step_order="sequential")
    fusion_before = copy.deepcopy(trainer.fusion_model.state_dict())
    task_before = copy.deepcopy(trainer.task_loss.state_dict())
    assert trainer.fusion_step(make_batch(3))["skipped"] == 0.0
    fusion_after, task_after = trainer.fusion_model.state_dict(), trainer.task_loss.state_dict()
    assert any(not torch.equal(fusion_after[k], v) for k, v in fusion_before.items())
    assert any(not torch.equal(task_after[k], v) for k, v in task_before.items())
