"""MetaFusionTrainer: exact hypergradients, side-effect-free meta steps, resume, errors."""

from __future__ import annotations

import copy
import csv
import math
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdfusion import LearnableFusionLoss, MetaFusionTrainer
from tdfusion.errors import CheckpointError, NonFiniteLossError
from tdfusion.trainer import CSVLogger, LambdaCallback, load_checkpoint


class TinyFusion(nn.Module):
    """A small convolutional fusion network: enough structure for second-order terms."""

    in_channels = 1

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv2(torch.tanh(self.conv1(torch.cat([a, b], 1)))))


class TinyGenerator(nn.Module):
    """A small loss generator: softmax over two channels."""

    def __init__(self, zero: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 1)
        if zero:  # constant 1/2 weights: the fixed-loss ablation
            for p in self.parameters():
                nn.init.zeros_(p)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(torch.cat([a, b], 1)))).softmax(dim=1)


class TinySegmentation(nn.Module):
    """A trainable task network T with a batch-norm buffer: per-pixel 3-class cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, fused: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.relu(self.norm(self.conv(fused))))
        return F.cross_entropy(logits, masks)


def reconstruct_a(fused: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A fixed task that needs one source: reproduce the target image."""
    return F.mse_loss(fused, target)


def make_batch(seed: int, n: int = 2, size: tuple[int, int] = (10, 12), dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 1, *size, generator=generator, dtype=dtype)
    b = torch.rand(n, 1, *size, generator=generator, dtype=dtype)
    masks = torch.randint(0, 3, (n, *size), generator=generator)
    return a, b, masks


def make_trainer(task: str, inner_optimizer: str = "sgd", **kwargs) -> MetaFusionTrainer:
    torch.manual_seed(0)
    fusion = TinyFusion().double()
    generator = TinyGenerator().double()
    task_loss = TinySegmentation().double() if task == "module" else reconstruct_a
    defaults = dict(inner_lr=0.3, task_lr=0.05, inner_optimizer=inner_optimizer, device="cpu")
    defaults.update(kwargs)
    return MetaFusionTrainer(fusion, task_loss, generator, **defaults)


def task_batches(task: str):
    meta_train, meta_test = make_batch(1), make_batch(2)
    if task == "callable":  # the target is the first source
        meta_train = (meta_train[0], meta_train[1], meta_train[0])
        meta_test = (meta_test[0], meta_test[1], meta_test[0])
    return meta_train, meta_test


def outer_loss_at(trainer, meta_train, meta_test, direction, step):
    params = dict(trainer.loss_generator.named_parameters())
    with torch.no_grad():
        for name, d in direction.items():
            params[name].add_(step * d)
    try:  # the inner step needs autograd, so no torch.no_grad() here
        return trainer.meta_loss(meta_train, meta_test).item()
    finally:
        with torch.no_grad():
            for name, d in direction.items():
                params[name].sub_(step * d)


@pytest.mark.parametrize("method", ["forward", "backprop"])
@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("task", ["callable", "module"])
def test_hypergradient_matches_central_finite_differences(task, inner_optimizer, method):
    trainer = make_trainer(task, inner_optimizer, hypergradient_method=method)
    meta_train, meta_test = task_batches(task)
    hypergradient = trainer.hypergradient(meta_train, meta_test)
    names = [n for n, _ in trainer.loss_generator.named_parameters()]
    assert list(hypergradient) == names
    assert any(g.abs().max() > 0 for g in hypergradient.values())

    # Directional derivatives d(outer)/d(eps) at eps = 0 along unit directions d, which must equal
    # <hypergradient, d>. The directions mix the hypergradient's own direction (largest signal,
    # so float64 round-off stays far below 1e-6 relative) with random ones. Central differences
    # with Richardson extrapolation: D = (4 D(h/2) - D(h)) / 3 has an O(h^4) error.
    generator = torch.Generator().manual_seed(5)
    norm = torch.sqrt(sum((g**2).sum() for g in hypergradient.values()))
    for mix in (1.0, 0.7, 0.5):
        direction = {}
        for n, p in trainer.loss_generator.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            direction[n] = mix * hypergradient[n] / norm + (1 - mix) * noise / math.sqrt(p.numel())

        def central(step, direction=direction):
            return (
                outer_loss_at(trainer, meta_train, meta_test, direction, step)
                - outer_loss_at(trainer, meta_train, meta_test, direction, -step)
            ) / (2 * step)

        numeric = (4 * central(5e-5) - central(1e-4)) / 3
        analytic = sum((hypergradient[n] * d).sum() for n, d in direction.items()).item()
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("weighting", ["linear", "squared"])
@pytest.mark.parametrize("method", ["forward", "backprop"])
@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_hypergradient_equals_backprop_through_the_whole_graph(inner_optimizer, method, weighting):
    trainer = make_trainer(
        "module",
        inner_optimizer,
        hypergradient_method=method,
        fusion_loss=LearnableFusionLoss(weighting=weighting),
        fusion_crop=(7, 9),
        task_size=(8, 11),
    )
    meta_train, meta_test = task_batches("module")
    # Masks at the task size: the task sees the sources resized to 8x11.
    meta_train = (*meta_train[:2], meta_train[2][:, :8, :11])
    meta_test = (*meta_test[:2], meta_test[2][:, :8, :11])
    params = dict(trainer.loss_generator.named_parameters())
    trainer.meta_generator.manual_seed(3)  # the same crop offsets for both computations
    hypergradient = trainer.hypergradient(meta_train, meta_test)
    trainer.meta_generator.manual_seed(3)
    full = torch.autograd.grad(trainer.meta_loss(meta_train, meta_test), list(params.values()))
    for (name, _), expected in zip(params.items(), full):
        torch.testing.assert_close(hypergradient[name], expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["forward", "backprop"])
@pytest.mark.parametrize("task", ["callable", "module"])
def test_a_torchopt_transformation_is_an_inner_optimizer(task, method):
    import torchopt

    meta_train, meta_test = task_batches(task)
    by_name = make_trainer(
        task, "sgd", inner_lr=1e-2, task_inner_lr=1e-2, hypergradient_method=method
    )
    # The transformation steps F and T with its own step size; inner_lr (0.3) is not used.
    given = make_trainer(task, torchopt.sgd(1e-2), hypergradient_method=method)
    expected = by_name.hypergradient(meta_train, meta_test)
    result = given.hypergradient(meta_train, meta_test)
    assert any(g.abs().max() > 0 for g in result.values())
    for name, value in expected.items():
        torch.testing.assert_close(result[name], value, rtol=1e-12, atol=1e-15)
    assert "inner_optimizer" not in given.config()  # a transformation is not saved


def test_sgd_hypergradient_is_the_second_order_formula():
    """Eq. 7 for SGD: dL_t/dtheta_G = -eta * d/dtheta_G <dL_f/dtheta_F, dL_t/dtheta_F'>."""
    trainer = make_trainer("callable", "sgd", inner_lr=0.2)
    meta_train, meta_test = task_batches("callable")
    hypergradient = trainer.hypergradient(meta_train, meta_test)

    fusion, generator = trainer.fusion_model, trainer.loss_generator
    theta = list(fusion.parameters())
    a, b, _ = meta_train
    inner = LearnableFusionLoss()(fusion(a, b), a, b, generator(a, b))
    inner_grads = torch.autograd.grad(inner, theta, create_graph=True)
    adapted = {n: p - 0.2 * g for (n, p), g in zip(fusion.named_parameters(), inner_grads)}
    leaves = {n: p.detach().requires_grad_() for n, p in adapted.items()}
    a_t, b_t, target_t = meta_test
    outer = reconstruct_a(torch.func.functional_call(fusion, leaves, (a_t, b_t)), target_t)
    v = torch.autograd.grad(outer, list(leaves.values()))
    inner_product = sum((g * vi).sum() for g, vi in zip(inner_grads, v))
    expected = torch.autograd.grad(-0.2 * inner_product, list(generator.parameters()))
    for (name, _), value in zip(generator.named_parameters(), expected):
        torch.testing.assert_close(hypergradient[name], value, rtol=1e-10, atol=1e-14)


class NoForwardMode(torch.autograd.Function):
    """An operation with a backward but no forward-mode rule (like some custom kernels)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class FusionWithCustomOp(TinyFusion):
    def forward(self, a, b):
        return NoForwardMode.apply(super().forward(a, b))


def test_auto_method_falls_back_to_backprop_when_forward_mode_is_unsupported():
    meta_train, meta_test = task_batches("callable")
    torch.manual_seed(0)
    auto = MetaFusionTrainer(
        FusionWithCustomOp().double(),
        reconstruct_a,
        TinyGenerator().double(),
        inner_lr=0.3,
        device="cpu",
    )
    with pytest.warns(RuntimeWarning, match="second-order back-propagation instead") as record:
        result = auto.hypergradient(meta_train, meta_test)
    assert record[0].filename == __file__  # the warning points at the caller's line
    torch.manual_seed(0)
    backprop = MetaFusionTrainer(
        FusionWithCustomOp().double(),
        reconstruct_a,
        TinyGenerator().double(),
        inner_lr=0.3,
        device="cpu",
        hypergradient_method="backprop",
    )
    expected = backprop.hypergradient(meta_train, meta_test)
    for name, value in expected.items():
        torch.testing.assert_close(result[name], value)
    forward_only = MetaFusionTrainer(
        FusionWithCustomOp().double(),
        reconstruct_a,
        TinyGenerator().double(),
        device="cpu",
        hypergradient_method="forward",
    )
    with pytest.raises(RuntimeError):
        forward_only.hypergradient(meta_train, meta_test)


def snapshot(trainer):
    modules = {"F": trainer.fusion_model, "G": trainer.loss_generator}
    if isinstance(trainer.task_loss, nn.Module):
        modules["T"] = trainer.task_loss
    return {
        key: {
            "tensors": {n: t for n, t in m.state_dict(keep_vars=True).items()},
            "values": copy.deepcopy(m.state_dict()),
            "grads": [p.grad for p in m.parameters()],
        }
        for key, m in modules.items()
    }


def test_hypergradient_changes_nothing():
    trainer = make_trainer("module", fusion_crop=6)
    meta_train, meta_test = task_batches("module")
    before = snapshot(trainer)
    rng_before = trainer.generator.get_state()
    meta_rng_before = trainer.meta_generator.get_state()
    optimizer_before = copy.deepcopy(trainer.fusion_optimizer.state_dict())
    trainer.hypergradient(meta_train, meta_test)
    after = snapshot(trainer)
    for key in before:
        assert after[key]["tensors"].keys() == before[key]["tensors"].keys()
        for name, tensor in after[key]["tensors"].items():
            assert tensor is before[key]["tensors"][name], f"{key}.{name} was replaced"
            assert torch.equal(tensor, before[key]["values"][name]), f"{key}.{name} changed"
        assert all(g is None for g in after[key]["grads"])
    assert torch.equal(trainer.generator.get_state(), rng_before)
    assert torch.equal(trainer.meta_generator.get_state(), meta_rng_before)
    assert trainer.fusion_optimizer.state_dict() == optimizer_before
    # The batch-norm statistics of T were used in training mode but are restored.
    assert trainer.task_loss.norm.num_batches_tracked.item() == 0


def test_meta_step_changes_only_the_generator():
    trainer = make_trainer("module")
    meta_train, meta_test = task_batches("module")
    before = snapshot(trainer)
    stats = trainer.meta_step(meta_train, meta_test)
    after = snapshot(trainer)
    for key in ("F", "T"):
        for name, tensor in after[key]["tensors"].items():
            assert tensor is before[key]["tensors"][name]
            assert torch.equal(tensor, before[key]["values"][name])
    changed = [
        name
        for name, tensor in after["G"]["tensors"].items()
        if not torch.equal(tensor, before["G"]["values"][name])
    ]
    assert changed
    assert all(isinstance(v, float) for v in stats.values())
    assert {"task_loss", "meta_train_task_loss", "fusion_loss", "hypergradient_max"} <= set(stats)


def test_normalized_update_moves_the_largest_coordinate_by_the_learning_rate():
    trainer = make_trainer("callable", generator_lr=1e-3)
    meta_train, meta_test = task_batches("callable")
    hypergradient = trainer.hypergradient(meta_train, meta_test)
    largest = max(g.abs().max() for g in hypergradient.values())
    before = {n: p.detach().clone() for n, p in trainer.loss_generator.named_parameters()}
    trainer.meta_step(meta_train, meta_test)
    for name, param in trainer.loss_generator.named_parameters():
        expected = before[name] - 1e-3 * hypergradient[name] / largest
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-15)
    moves = [
        (p.detach() - before[n]).abs().max() for n, p in trainer.loss_generator.named_parameters()
    ]
    assert max(moves).item() == pytest.approx(1e-3)


def test_optimizer_update_uses_adam_on_the_hypergradient():
    trainer = make_trainer("callable", generator_update="optimizer", generator_lr=1e-3)
    assert isinstance(trainer.generator_optimizer, torch.optim.Adam)
    meta_train, meta_test = task_batches("callable")
    hypergradient = trainer.hypergradient(meta_train, meta_test)
    before = {n: p.detach().clone() for n, p in trainer.loss_generator.named_parameters()}
    trainer.meta_step(meta_train, meta_test)
    for name, param in trainer.loss_generator.named_parameters():
        # Adam's first step: lr * g / (|g| + eps), bias corrections cancel, eps = 1e-8.
        move = param.detach() - before[name]
        grad = hypergradient[name]
        expected = -1e-3 * grad / (grad.abs() + 1e-8)
        torch.testing.assert_close(move, expected, rtol=1e-6, atol=1e-12)


def test_fusion_step_trains_fusion_and_task_but_not_the_generator():
    trainer = make_trainer("module", fusion_lr=1e-2)
    batch = make_batch(3)
    generator_before = copy.deepcopy(trainer.loss_generator.state_dict())
    fusion_before = copy.deepcopy(trainer.fusion_model.state_dict())
    task_before = copy.deepcopy(trainer.task_loss.state_dict())
    stats = trainer.fusion_step(batch)
    assert {"fusion_loss", "fusion_intensity", "fusion_gradient", "task_loss"} <= set(stats)
    for name, value in trainer.loss_generator.state_dict().items():
        assert torch.equal(value, generator_before[name])
    assert any(
        not torch.equal(v, fusion_before[k]) for k, v in trainer.fusion_model.state_dict().items()
    )
    assert any(
        not torch.equal(v, task_before[k]) for k, v in trainer.task_loss.state_dict().items()
    )


def test_fusion_step_gradient_is_the_fusion_loss_gradient_only():
    """F must learn from L_f alone (the task loss reaches T on detached images)."""
    trainer = make_trainer("module", fusion_lr=1e-2)
    trainer.fusion_optimizer = torch.optim.SGD(trainer.fusion_model.parameters(), lr=0.1)
    a, b, masks = make_batch(4)
    fusion = copy.deepcopy(trainer.fusion_model)
    weights = trainer.loss_generator(a, b).detach()
    loss = LearnableFusionLoss()(fusion(a, b), a, b, weights)
    expected_grads = torch.autograd.grad(loss, list(fusion.parameters()))
    trainer.fusion_step((a, b, masks))
    for (name, param), before, grad in zip(
        trainer.fusion_model.named_parameters(), fusion.parameters(), expected_grads
    ):
        torch.testing.assert_close(param.detach(), before.detach() - 0.1 * grad, msg=name)


def test_crop_and_task_size_feed_the_right_shapes():
    seen = {}

    def task_loss(fused, target):
        seen["fused"] = tuple(fused.shape)
        return F.mse_loss(fused, target)

    class ShapeRecordingGenerator(TinyGenerator):
        def forward(self, a, b):
            seen["generator"] = tuple(a.shape)
            return super().forward(a, b)

    trainer = MetaFusionTrainer(
        TinyFusion().double(),
        task_loss,
        ShapeRecordingGenerator().double(),
        fusion_crop=(6, 8),
        task_size=(5, 7),
        device="cpu",
    )
    a, b, _ = make_batch(1, size=(10, 12))
    target = torch.rand(2, 1, 5, 7, dtype=torch.float64)
    trainer.meta_step((a, b, target), (b, a, target))
    assert seen == {"generator": (2, 1, 6, 8), "fused": (2, 1, 5, 7)}
    with pytest.raises(ValueError, match=r"fusion_crop 11x8 is larger than the images \(10x12\)"):
        MetaFusionTrainer(
            TinyFusion().double(),
            task_loss,
            TinyGenerator().double(),
            fusion_crop=(11, 8),
            device="cpu",
        ).fusion_step((a, b, target))


def test_dtype_and_device_are_kept_and_batches_converted():
    trainer = make_trainer("callable")
    assert trainer.device == torch.device("cpu")
    assert next(trainer.fusion_model.parameters()).dtype == torch.float64
    a, b, _ = make_batch(1, dtype=torch.float32)
    stats = trainer.fusion_step((a, b, a))  # float32 batch on a float64 model
    assert math.isfinite(stats["fusion_loss"])


@pytest.mark.parametrize(
    ("batch", "error", "message"),
    [
        ((torch.rand(2, 1, 8, 8),), ValueError, r"tuple \(a, b, target\), got a tuple of length 1"),
        (
            (torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 9), None),
            ValueError,
            r"a \(2, 1, 8, 8\) and b \(2, 1, 8, 9\)",
        ),
        ((torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8), None), ValueError, "1-channel sources"),
        ((torch.rand(1, 8, 8), torch.rand(1, 8, 8), None), ValueError, r"\(N, C, H, W\)"),
        (([1.0], torch.rand(1, 1, 8, 8), None), TypeError, "a must be a tensor"),
    ],
)
def test_bad_batches_get_clear_errors(batch, error, message):
    trainer = make_trainer("callable")
    with pytest.raises(error, match=message):
        trainer.fusion_step(batch)


def test_values_outside_unit_range_warn_once():
    trainer = make_trainer("callable")
    a, b, _ = make_batch(1)
    with pytest.warns(
        UserWarning, match=r"values in \[0\.\d+, 255\]; tdfusion expects images scaled to \[0, 1\]"
    ):
        trainer.fusion_step((a * 255, b, a))
    with warnings_as_errors():
        trainer.fusion_step((a * 255, b, a))


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._context = warnings.catch_warnings()
        self._context.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def nan_task(fused, target):
    return (fused * float("nan")).mean()


def test_non_finite_loss_stops_with_step_and_losses():
    trainer = make_trainer("callable")
    trainer.task_loss = nan_task
    a, b, _ = make_batch(1)
    with pytest.raises(
        NonFiniteLossError, match=r"meta step at epoch 0, global step 0: .*task_loss=nan"
    ):
        trainer.meta_step((a, b, a), (b, a, b))


def test_non_finite_loss_can_be_skipped_with_a_warning():
    trainer = make_trainer("callable", on_nonfinite="skip")
    trainer.task_loss = nan_task
    a, b, _ = make_batch(1)
    before = copy.deepcopy(trainer.loss_generator.state_dict())
    with pytest.warns(RuntimeWarning, match="update skipped"):
        stats = trainer.meta_step((a, b, a), (b, a, b))
    assert stats["skipped"] == 1.0
    for name, value in trainer.loss_generator.state_dict().items():
        assert torch.equal(value, before[name])


def test_a_fusion_loss_without_terms_trains_normally():
    """A plain callable fusion loss has no intensity/gradient split; that is not a NaN loss."""

    def plain_fusion_loss(fused, a, b, weights):
        return (weights[:, :1] * (fused - a) ** 2 + weights[:, 1:] * (fused - b) ** 2).mean()

    trainer = make_trainer("module", fusion_loss=plain_fusion_loss)
    a, b, masks = make_batch(1)
    before = copy.deepcopy(trainer.loss_generator.state_dict())
    meta_stats = trainer.meta_step((a, b, masks), make_batch(2))
    fusion_stats = trainer.fusion_step((a, b, masks))
    assert meta_stats["skipped"] == fusion_stats["skipped"] == 0.0
    assert math.isnan(fusion_stats["fusion_intensity"])  # logged as unknown
    moved = trainer.loss_generator.state_dict()
    assert any(not torch.equal(moved[name], before[name]) for name in before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inner_optimizer": "rmsprop"}, "inner_optimizer"),
        ({"generator_update": "adam"}, "generator_update"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
        ({"inner_lr": 0.0}, "inner_lr must be positive"),
        ({"fusion_crop": 0}, "fusion_crop must be positive"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer("callable", **kwargs)


# ---------------------------------------------------------------------- fit and resume
def segmentation_loader(seed: int = 0, batches: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(2 * batches, 1, 12, 12, generator=generator, dtype=torch.float64)
    b = torch.rand(2 * batches, 1, 12, 12, generator=generator, dtype=torch.float64)
    masks = torch.randint(0, 3, (2 * batches, 12, 12), generator=generator)
    return DataLoader(TensorDataset(a, b, masks), batch_size=2, shuffle=True)


def resumable_trainer():
    return make_trainer(
        "module",
        fusion_crop=8,
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5),
        seed=11,
    )


def test_fit_runs_the_schedule_and_reports_each_step(tmp_path):
    trainer = resumable_trainer()
    records = []
    history = trainer.fit(
        segmentation_loader(),
        epochs=2,
        meta_steps=3,
        callbacks=[
            LambdaCallback(on_step_end=lambda t, s: records.append(s)),
            CSVLogger(tmp_path / "log.csv"),
        ],
        progress=False,
    )
    phases = [r["phase"] for r in records]
    assert phases == (["meta"] * 3 + ["fusion"] * 4) * 2
    assert [r["global_step"] for r in records] == list(range(14))
    assert len(history) == 2 and history[1]["epoch"] == 1
    assert {"meta_task_loss", "fusion_loss", "task_loss", "meta_steps", "fusion_steps"} <= set(
        history[0]
    )
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert len(rows) == 14 and rows[0]["phase"] == "meta" and rows[-1]["phase"] == "fusion"
    # The schedule halves every learning rate after each epoch.
    assert trainer.fusion_optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * 1e-4)
    assert trainer.lr_scale == pytest.approx(0.25)


def test_meta_steps_zero_freezes_the_generator():
    trainer = resumable_trainer()
    before = copy.deepcopy(trainer.loss_generator.state_dict())
    trainer.fit(segmentation_loader(), epochs=1, meta_steps=0, progress=False)
    for name, value in trainer.loss_generator.state_dict().items():
        assert torch.equal(value, before[name])


def test_fit_needs_two_batches_for_meta_steps():
    trainer = resumable_trainer()
    with pytest.raises(ValueError, match="at least two batches"):
        trainer.fit(segmentation_loader(batches=1), epochs=1, meta_steps=1, progress=False)


def test_resume_gives_the_same_parameters_as_a_straight_run(tmp_path):
    straight = resumable_trainer()
    torch.manual_seed(123)
    straight.fit(segmentation_loader(), epochs=2, meta_steps=2, progress=False)

    first = resumable_trainer()
    torch.manual_seed(123)
    first.fit(
        segmentation_loader(),
        epochs=1,
        meta_steps=2,
        checkpoint=tmp_path / "ckpt.pt",
        progress=False,
    )
    torch.manual_seed(999)  # whatever happens in between must not matter
    resumed = make_trainer(
        "module",
        fusion_crop=8,
        seed=0,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5),
    )
    resumed.fit(
        segmentation_loader(), epochs=2, meta_steps=2, resume=tmp_path / "ckpt.pt", progress=False
    )

    for module in ("fusion_model", "loss_generator", "task_loss"):
        expected = getattr(straight, module).state_dict()
        for name, value in getattr(resumed, module).state_dict().items():
            assert torch.equal(value, expected[name]), f"{module}.{name} differs after resume"
    assert resumed.epoch == straight.epoch == 2
    assert resumed.global_step == straight.global_step
    assert len(resumed.history) == 2


def test_checkpoint_is_written_atomically_and_loads_with_weights_only(tmp_path):
    trainer = resumable_trainer()
    trainer.fit(
        segmentation_loader(),
        epochs=1,
        meta_steps=1,
        checkpoint=tmp_path / "ckpt.pt",
        progress=False,
    )
    # No temporary file left behind; the checkpoint's lock file stays (it holds no lock).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.pt.lock", "ckpt.pt"]
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["format"] == "tdfusion.trainer" and checkpoint["epoch"] == 1
    assert set(checkpoint["optimizers"]) == {"fusion", "generator", "task"}
    assert set(checkpoint["schedulers"]) == {"fusion", "generator", "task"}


def test_load_rebuilds_the_trainer(tmp_path):
    trainer = make_trainer("module", inner_lr=0.123, fusion_crop=(6, 8))
    trainer.fusion_step(make_batch(1))
    trainer.save(tmp_path / "trainer.pt")
    loaded = MetaFusionTrainer.load(
        tmp_path / "trainer.pt",
        TinyFusion().double(),
        TinySegmentation().double(),
        loss_generator=TinyGenerator().double(),
    )
    assert loaded.inner_lr == 0.123 and loaded.fusion_crop == (6, 8)
    for name, value in loaded.fusion_model.state_dict().items():
        assert torch.equal(value, trainer.fusion_model.state_dict()[name])
    assert loaded.fusion_optimizer.state_dict()["state"].keys() == (
        trainer.fusion_optimizer.state_dict()["state"].keys()
    )


def test_loading_into_a_different_architecture_names_the_keys(tmp_path):
    trainer = make_trainer("callable")
    trainer.save(tmp_path / "trainer.pt")
    expected = r"entry 'fusion_model' does not fit TinyFusion: shape mismatches: conv1.weight"
    with pytest.raises(CheckpointError, match=expected):
        MetaFusionTrainer.load(
            tmp_path / "trainer.pt",
            TinyFusion(width=5).double(),
            reconstruct_a,
            loss_generator=TinyGenerator().double(),
        )


def test_loading_something_else_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(1)}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointError, match="not a tdfusion trainer checkpoint"):
        load_checkpoint(tmp_path / "weights.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------------- behaviour
def blob_images(count: int, seed: int, size: int = 24) -> torch.Tensor:
    """Smooth random blobs: the informative source."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(count, 1, size // 4, size // 4, generator=generator)
    return F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)


def train_and_evaluate(meta_steps: int) -> tuple[float, float]:
    """Train on a pair where only ``a`` matters; return the held-out task loss and mean w_a."""
    torch.manual_seed(0)
    a = blob_images(16, seed=1)
    b = torch.rand(16, 1, 24, 24, generator=torch.Generator().manual_seed(2))  # distracting texture
    loader = DataLoader(
        TensorDataset(a, b, a),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(3),
    )
    trainer = MetaFusionTrainer(
        TinyFusion(width=8),
        reconstruct_a,
        TinyGenerator(zero=True),  # starts at w_a = w_b = 1/2
        LearnableFusionLoss(alpha=0.1),
        inner_lr=0.5,
        generator_lr=0.1,
        fusion_lr=1e-2,
        device="cpu",
        seed=0,
    )
    trainer.fit(loader, epochs=12, meta_steps=meta_steps, progress=False)
    held_out_a = blob_images(8, seed=10)
    held_out_b = torch.rand(8, 1, 24, 24, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        fused = trainer.fusion_model(held_out_a, held_out_b)
        weight_a = trainer.loss_generator(held_out_a, held_out_b)[:, 0].mean().item()
        return reconstruct_a(fused, held_out_a).item(), weight_a


def test_learned_loss_beats_the_fixed_half_weights_on_a_task_that_needs_one_source():
    fixed_loss, fixed_weight = train_and_evaluate(meta_steps=0)
    learned_loss, learned_weight = train_and_evaluate(meta_steps=4)
    assert fixed_weight == pytest.approx(0.5)  # meta_steps=0: the generator stayed frozen
    assert learned_weight > 0.9  # the generator learned that the task needs source a
    assert learned_loss < 0.6 * fixed_loss, f"learned {learned_loss:.4f} vs fixed {fixed_loss:.4f}"


class _RecordingSummaryWriter:
    """Stands in for tensorboard's SummaryWriter (tensorboard is not a dependency)."""

    created: ClassVar[list[_RecordingSummaryWriter]] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.closed = log_dir, [], False
        _RecordingSummaryWriter.created.append(self)

    def add_scalar(self, tag, value, step) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("main_process", [True, False], ids=["rank-0", "other-rank"])
def test_loggers_write_on_the_main_process_only(tmp_path, monkeypatch, main_process):
    import sys
    import types

    from tdfusion.trainer import TensorBoardLogger

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = _RecordingSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    _RecordingSummaryWriter.created.clear()
    trainer = make_trainer("module")
    trainer.rank = 0 if main_process else 1  # what a distributed trainer on that rank holds
    loader = DataLoader(TensorDataset(*make_batch(3, n=4)), batch_size=2)
    board = TensorBoardLogger(tmp_path / "events")
    trainer.fit(
        loader,
        epochs=1,
        meta_steps=1,
        callbacks=[CSVLogger(tmp_path / "log.csv"), board],
        progress=False,
    )
    assert (tmp_path / "log.csv").exists() == main_process
    if main_process:
        (writer,) = _RecordingSummaryWriter.created
        assert writer.closed and writer.log_dir == str(tmp_path / "events")
        assert ("meta/task_loss", pytest.approx(trainer.history[0]["meta_task_loss"]), 0) in (
            writer.scalars
        )
    else:
        assert _RecordingSummaryWriter.created == []


# ---------------------------------------------------------------------- faults (issue 13)
def full_state(trainer) -> dict:
    """Every parameter, buffer and optimiser state of F, G and T, copied."""
    modules = {"F": trainer.fusion_model, "G": trainer.loss_generator}
    if isinstance(trainer.task_loss, nn.Module):
        modules["T"] = trainer.task_loss
    state = {key: module.state_dict() for key, module in modules.items()}
    state.update({f"optimizer {k}": o.state_dict() for k, o in trainer.optimizers.items()})
    return copy.deepcopy(state)


def assert_same_state(before, after, where=""):
    """Equal values, NaN included (a NaN that appeared counts as a change)."""
    if isinstance(before, torch.Tensor):
        assert torch.equal(before, after), f"{where} changed"
    elif isinstance(before, dict):
        assert before.keys() == after.keys(), f"{where} keys changed"
        for key in before:
            assert_same_state(before[key], after[key], f"{where}[{key!r}]")
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after), f"{where} length changed"
        for index, (x, y) in enumerate(zip(before, after)):
            assert_same_state(x, y, f"{where}[{index}]")
    else:
        assert before == after, f"{where} changed"


def with_nan_pixel(batch):
    a, b, target = batch
    a = a.clone()
    a[0, 0, 3, 4] = float("nan")
    return a, b, target


def run_under_policy(on_nonfinite: str, step, match: str):
    """Call ``step``: it must warn and report ``skipped`` ("skip"), or raise ("raise")."""
    if on_nonfinite == "raise":
        with pytest.raises(NonFiniteLossError, match=match):
            step()
    else:
        with pytest.warns(RuntimeWarning, match=match + ".*update skipped"):
            stats = step()
        assert stats["skipped"] == 1.0


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_a_fusion_step_with_a_nan_pixel_changes_nothing(on_nonfinite):
    trainer = make_trainer("module", on_nonfinite=on_nonfinite, optimizer="adam")
    trainer.fusion_step(make_batch(1))  # the optimisers have state, T's statistics have moved
    before = full_state(trainer)
    run_under_policy(
        on_nonfinite,
        lambda: trainer.fusion_step(with_nan_pixel(make_batch(2))),
        "non-finite value in the fusion step",
    )
    assert_same_state(before, full_state(trainer))
    assert torch.isfinite(
        trainer.task_loss(trainer.fusion_model(*make_batch(3)[:2]), make_batch(3)[2])
    )
    assert trainer.fusion_step(make_batch(4))["skipped"] == 0.0  # and training goes on


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
@pytest.mark.parametrize("trainable_task", [True, False], ids=["T", "frozen-T"])
def test_a_meta_step_with_a_nan_pixel_changes_nothing(on_nonfinite, trainable_task):
    trainer = make_trainer("module", on_nonfinite=on_nonfinite)
    if not trainable_task:  # called as it is, in training mode, by the outer loss
        trainer.task_loss.requires_grad_(False)
    trainer.meta_step(make_batch(1), make_batch(2))
    before = full_state(trainer)
    run_under_policy(
        on_nonfinite,
        lambda: trainer.meta_step(make_batch(3), with_nan_pixel(make_batch(4))),
        "non-finite value in the meta step",
    )
    assert_same_state(before, full_state(trainer))


def sqrt_at_zero(fused: torch.Tensor) -> torch.Tensor:
    """Zero, with an infinite gradient: d sqrt(x)/dx at x = 0."""
    return torch.sqrt(fused - fused.detach()).mean()


def fusion_loss_with_an_infinite_gradient(fused, a, b, weights):
    loss = (weights[:, :1] * (fused - a) ** 2 + weights[:, 1:] * (fused - b) ** 2).mean()
    return loss + sqrt_at_zero(fused)


class TaskWithAnInfiniteGradient(TinySegmentation):
    def forward(self, fused: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.relu(self.norm(self.conv(fused))))
        return F.cross_entropy(logits, masks) + sqrt_at_zero(logits)


@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
@pytest.mark.parametrize("grad_clip", [None, 1.0], ids=["no-clip", "clip"])
@pytest.mark.parametrize("culprit", ["fusion_model", "task"])
def test_an_infinite_gradient_with_a_finite_loss_changes_nothing(on_nonfinite, grad_clip, culprit):
    kwargs = dict(on_nonfinite=on_nonfinite, grad_clip=grad_clip, optimizer="adam")
    if culprit == "fusion_model":
        kwargs["fusion_loss"] = fusion_loss_with_an_infinite_gradient
    trainer = make_trainer("module", **kwargs)
    if culprit == "task":
        trainer.task_loss.load_state_dict(TinySegmentation().double().state_dict())
        trainer.task_loss.__class__ = TaskWithAnInfiniteGradient
    before = full_state(trainer)
    run_under_policy(
        on_nonfinite,
        lambda: trainer.fusion_step(make_batch(1)),
        rf"NaN or infinite gradient in the fusion step at epoch 0, global step 0: {culprit}\.",
    )
    assert_same_state(before, full_state(trainer))
    assert all(p.grad is None for p in trainer.fusion_model.parameters())


def test_a_nan_anywhere_in_the_hypergradient_skips_the_meta_step(monkeypatch):
    trainer = make_trainer("callable", on_nonfinite="skip")
    hypergradient = trainer._hypergradient

    def poisoned(*args):
        gradients, tensors = hypergradient(*args)
        last = list(gradients)[-1]  # after finite ones: Python's max() would not see it
        gradients[last] = gradients[last].clone().fill_(float("nan"))
        return gradients, tensors

    monkeypatch.setattr(trainer, "_hypergradient", poisoned)
    before = full_state(trainer)
    with pytest.warns(RuntimeWarning, match="hypergradient_max=nan; update skipped"):
        stats = trainer.meta_step(*task_batches("callable"))
    assert stats["skipped"] == 1.0
    assert_same_state(before, full_state(trainer))


def test_a_checkpoint_holding_nan_is_refused_and_the_last_one_kept(tmp_path):
    trainer = make_trainer("module")
    trainer.save(tmp_path / "ckpt.pt")
    good = (tmp_path / "ckpt.pt").read_bytes()
    with torch.no_grad():
        trainer.task_loss.norm.running_var[1] = float("nan")  # a buffer may hold inf, not NaN
    with pytest.raises(
        NonFiniteLossError,
        match=r"refusing to write checkpoint .*ckpt\.pt: models\['task'\].*running_var'\] holds",
    ):
        trainer.save(tmp_path / "ckpt.pt")
    assert (tmp_path / "ckpt.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


SIGTERM_DURING_A_CHECKPOINT_WRITE = """
import os, signal, sys
import torch
sys.path.insert(0, sys.argv[2])
from test_trainer import resumable_trainer, segmentation_loader

real_save, writes = torch.save, []

def save_then_terminated(obj, file, *args, **kwargs):
    real_save(obj, file, *args, **kwargs)
    writes.append(file)
    if len(writes) == 2:  # the second epoch's checkpoint, before it replaces the first
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000):  # the handler runs here, inside the write
            pass

torch.save = save_then_terminated
resumable_trainer().fit(
    segmentation_loader(), epochs=3, meta_steps=1, checkpoint=sys.argv[1], progress=False
)
print("SIGTERM was ignored")
"""


def test_sigterm_during_a_checkpoint_write_keeps_the_last_checkpoint_and_exits_143(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(tests.parent), "OMP_NUM_THREADS": "1"}
    checkpoint = tmp_path / "ckpt.pt"
    result = subprocess.run(
        [sys.executable, "-c", SIGTERM_DURING_A_CHECKPOINT_WRITE, str(checkpoint), str(tests)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 143, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert load_checkpoint(checkpoint)["epoch"] == 1  # the last complete checkpoint
    # The abandoned write left no temporary file (the lock file holds no lock).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.pt.lock", "ckpt.pt"]


def test_fit_handles_sigterm_only_while_it_runs_and_restores_the_handler():
    import signal
    import threading

    seen = []
    record = LambdaCallback(on_step_end=lambda t, s: seen.append(signal.getsignal(signal.SIGTERM)))
    previous = signal.getsignal(signal.SIGTERM)
    make_trainer("module").fit(segmentation_loader(), 1, 0, callbacks=[record], progress=False)
    assert seen and all(handler not in (signal.SIG_DFL, previous) for handler in seen)
    assert signal.getsignal(signal.SIGTERM) is previous

    # Only the main thread can set handlers: elsewhere fit trains without one.
    errors = []

    def fit_in_a_thread():
        try:
            make_trainer("module").fit(segmentation_loader(), 1, 0, progress=False)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    thread = threading.Thread(target=fit_in_a_thread)
    thread.start()
    thread.join()
    assert errors == []
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_resumed_csv_log_holds_each_step_once(tmp_path):
    log, checkpoint = tmp_path / "log.csv", tmp_path / "ckpt.pt"
    resumable_trainer().fit(
        segmentation_loader(),
        epochs=1,
        meta_steps=2,
        checkpoint=checkpoint,
        callbacks=[CSVLogger(log)],
        progress=False,
    )

    class Killed(Exception):
        pass

    def kill_during_the_second_epoch(trainer, stats):
        if stats["phase"] == "fusion" and stats["step"] == 1:
            raise Killed  # after the logger wrote this step's row; no checkpoint of epoch 2

    with pytest.raises(Killed):
        resumable_trainer().fit(
            segmentation_loader(),
            epochs=2,
            meta_steps=2,
            resume=checkpoint,
            checkpoint=checkpoint,
            callbacks=[CSVLogger(log), LambdaCallback(on_step_end=kill_during_the_second_epoch)],
            progress=False,
        )
    with log.open("a") as stream:
        stream.write("fusion,1,2")  # and a row torn by the kill
    resumed = resumable_trainer()
    resumed.fit(
        segmentation_loader(),
        epochs=2,
        meta_steps=2,
        resume=checkpoint,
        callbacks=[CSVLogger(log)],
        progress=False,
    )
    with log.open(newline="") as stream:
        steps = [int(row["global_step"]) for row in csv.DictReader(stream)]
    assert steps == list(range(resumed.global_step))


class TaskReturning(nn.Module):
    """A trainable task whose loss is ``make(fused, target)``, whatever that is."""

    def __init__(self, make) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.make = make

    def forward(self, fused, target):
        return self.make(fused * self.scale, target)


BAD_TASK_LOSSES = {
    "None": (lambda fused, target: None, "got None"),
    "float": (lambda fused, target: 0.5, "got float 0.5"),
    "no graph": (lambda fused, target: torch.tensor(0.5), "got a tensor without a graph"),
    "not scalar": (lambda fused, target: (fused - target) ** 2, r"got a tensor of shape \(2, 1,"),
    "integer": (lambda fused, target: (fused > 0.5).sum(), "got a torch.int64 tensor"),
}


@pytest.mark.parametrize("step", ["meta_step", "fusion_step"])
@pytest.mark.parametrize("bad", list(BAD_TASK_LOSSES))
def test_a_task_loss_that_is_not_a_scalar_with_a_graph_is_named(step, bad):
    make, found = BAD_TASK_LOSSES[bad]
    task = TaskReturning(make)
    if step == "meta_step":
        task.requires_grad_(False)  # a fixed task: only the outer loss is computed
    trainer = MetaFusionTrainer(TinyFusion().double(), task, TinyGenerator().double(), device="cpu")
    a, b, _ = make_batch(1)
    with pytest.raises(
        TypeError,
        match=rf"{step.replace('_', ' ')}: task_loss must return a scalar tensor "
        rf"with a graph, {found}",
    ):
        getattr(trainer, step)(*([(a, b, a), (b, a, b)] if step == "meta_step" else [(a, b, a)]))


class _NoLength:
    def __iter__(self):
        return iter(())


@pytest.mark.parametrize("loader", ["empty dataset", "no length"])
def test_an_empty_loader_is_refused_before_any_checkpoint(tmp_path, loader):
    from tdfusion.errors import DataError

    empty = (
        DataLoader(TensorDataset(*make_batch(1, n=0)), batch_size=2)
        if loader == "empty dataset"
        else _NoLength()
    )
    with pytest.raises(DataError, match="train_loader yielded no batches"):
        make_trainer("module").fit(
            empty, epochs=2, meta_steps=0, checkpoint=tmp_path / "ckpt.pt", progress=False
        )
    assert not (tmp_path / "ckpt.pt").exists()


def test_resuming_a_finished_run_warns_that_there_is_nothing_to_train(tmp_path):
    trainer = make_trainer("module")
    trainer.fit(segmentation_loader(), 1, 0, checkpoint=tmp_path / "ckpt.pt", progress=False)
    with pytest.warns(UserWarning, match=r"nothing to train: checkpoint .*ckpt\.pt is at epoch 1"):
        make_trainer("module").fit(
            segmentation_loader(), 1, 0, resume=tmp_path / "ckpt.pt", progress=False
        )


class UnboundedFusion(TinyFusion):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return 10.0 * (super().forward(a, b) - 0.5)  # about [-0.5, 0.5]


def test_a_fused_image_outside_the_unit_range_warns_once():
    torch.manual_seed(0)
    trainer = MetaFusionTrainer(
        UnboundedFusion().double(), reconstruct_a, TinyGenerator().double(), device="cpu"
    )
    a, b, _ = make_batch(1)
    with pytest.warns(UserWarning, match=r"the fusion model returned values in \[-"):
        trainer.fusion_step((a, b, a))
    with warnings_as_errors():
        trainer.fusion_step((a, b, a))


def test_zero_size_images_are_a_data_error():
    from tdfusion.errors import DataError

    empty = torch.rand(2, 1, 0, 12, dtype=torch.float64)
    with pytest.raises(DataError, match=r"batch: a and b hold no pixels \(shape \(2, 1, 0, 12\)\)"):
        make_trainer("callable").fusion_step((empty, empty, empty))


def test_a_second_fit_on_the_same_checkpoint_fails_with_one_line(tmp_path):
    from tdfusion.errors import OutputInUseError

    checkpoint = tmp_path / "ckpt.pt"
    failures = []

    def second_fit(trainer, stats):
        if failures:
            return
        try:
            make_trainer("module").fit(
                segmentation_loader(), 1, 0, checkpoint=checkpoint, progress=False
            )
        except OutputInUseError as error:
            failures.append(str(error))

    first = make_trainer("module")
    first.fit(
        segmentation_loader(),
        1,
        0,
        checkpoint=checkpoint,
        callbacks=[LambdaCallback(on_step_end=second_fit)],
        progress=False,
    )
    (message,) = failures
    assert "\n" not in message and f"{checkpoint} is in use by another tdfusion process" in message
    assert load_checkpoint(checkpoint)["epoch"] == 1  # the first run's, whole
    # Released when fit returns: the next run takes it.
    make_trainer("module").fit(
        segmentation_loader(), 2, 0, resume=checkpoint, checkpoint=checkpoint, progress=False
    )


def test_resuming_from_a_file_that_runs_code_is_refused_without_unsafe_advice(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (exec, ("open('ran', 'w').close()",))

    torch.save({"format": "tdfusion.trainer", "payload": RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as caught:
        make_trainer("module").fit(
            segmentation_loader(), 1, 0, resume=tmp_path / "evil.pt", progress=False
        )
    message = str(caught.value)
    assert "refers to exec" in message and "never runs code" in message
    assert "weights_only=False" not in message and "\x1b" not in message
    assert not (tmp_path / "ran").exists()


def test_a_checkpoint_of_a_machine_with_more_gpus_restores_the_devices_this_one_has(monkeypatch):
    from tdfusion.trainer import checkpoint

    state = checkpoint.capture_rng_state()
    state["cuda"] = [torch.full((8,), float(index)) for index in range(4)]  # saved on 4 GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda value, device: restored.append((int(value[0]), device))
    )
    checkpoint.restore_rng_state(state)
    assert restored == [(0, 0), (1, 1)]


def test_resume_reads_the_checkpoint_on_the_cpu(tmp_path, monkeypatch):
    # On a GPU, a checkpoint read onto the training device would put the saved random states
    # there too, and torch.set_rng_state / numpy take CPU tensors only.
    from tdfusion.trainer import loop

    trainer = resumable_trainer()
    trainer.fit(
        segmentation_loader(), epochs=1, meta_steps=1, checkpoint=tmp_path / "c.pt", progress=False
    )
    locations = []
    real_load = loop.load_checkpoint

    def spy(path, map_location="cpu"):
        locations.append(map_location)
        return real_load(path, map_location=map_location)

    monkeypatch.setattr(loop, "load_checkpoint", spy)
    resumable_trainer().fit(
        segmentation_loader(), epochs=2, meta_steps=1, resume=tmp_path / "c.pt", progress=False
    )
    assert locations == ["cpu"]


def test_a_generator_off_the_cpu_is_refused_as_seed():
    class CudaGenerator(torch.Generator):  # a stand-in: no CUDA here
        device = torch.device("cuda", 0)

    with pytest.raises(ValueError, match="drawn on the CPU.*cuda:0"):
        make_trainer("module", seed=CudaGenerator())
