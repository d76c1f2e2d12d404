"""The trainer's speed options: mixed precision, torch.compile with its fallback, channels-last.

Measured on the CPU with the tiny networks below (2 x 1 x 32 x 32 batches): the bf16
hypergradient's cosine with the float32 one is 0.99995-0.99997 (both methods, a fixed task
and a trainable task network; its norm differs by 0.8% and 5%), the generator's move in a
bf16 meta step has cosine 0.99996 with float32's; a fusion step's losses differ from float32's
by at most 4.2e-5 (bf16) and 1.9e-5 (fp16), relative. The tests allow 1e-3 and 0.999.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_trainer import (
    TinyFusion,
    TinyGenerator,
    TinySegmentation,
    assert_same_state,
    full_state,
    reconstruct_a,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdfusion import LearnableFusionLoss, MetaFusionTrainer
from tdfusion.cli import build_parser, main
from tdfusion.errors import DataError
from tdfusion.recipes import RECIPES, build_trainer
from tdfusion.trainer.compilation import CompiledCall
from tdfusion.trainer.precision import Autocast, check_precision, forward_derivative


def batch(seed: int, size: tuple[int, int] = (32, 32), n: int = 2, task: str = "module"):
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 1, *size, generator=generator)
    b = torch.rand(n, 1, *size, generator=generator)
    masks = torch.randint(0, 3, (n, *size), generator=generator)
    return (a, b, masks) if task == "module" else (a, b, a)


def trainer_for(task: str = "module", seed: int = 0, **kwargs) -> MetaFusionTrainer:
    torch.manual_seed(seed)
    task_loss = TinySegmentation() if task == "module" else reconstruct_a
    options = dict(inner_lr=0.3, task_lr=0.05, device="cpu")
    options.update(kwargs)
    return MetaFusionTrainer(TinyFusion(), task_loss, TinyGenerator(), **options)


def flat(named: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([value.flatten() for value in named.values()])


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cosine_similarity(x.double(), y.double(), dim=0))


def tensors_of(state) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for value in state.values() for t in tensors_of(value)]
    if isinstance(state, (list, tuple)):
        return [t for value in state for t in tensors_of(value)]
    return []


# ---------------------------------------------------------------------- bf16
@pytest.mark.parametrize("method", ["forward", "backprop"])
@pytest.mark.parametrize("task", ["callable", "module"])
def test_bf16_hypergradient_points_where_the_float32_one_does(task, method):
    meta_train, meta_test = batch(1, task=task), batch(2, task=task)
    exact = trainer_for(task, hypergradient_method=method).hypergradient(meta_train, meta_test)
    mixed = trainer_for(task, hypergradient_method=method, precision="bf16").hypergradient(
        meta_train, meta_test
    )
    assert all(g.dtype == torch.float32 for g in mixed.values())
    assert cosine(flat(mixed), flat(exact)) > 0.999  # measured 0.99995-0.99997


def test_bf16_meta_step_moves_the_generator_as_float32_does():
    meta_train, meta_test = batch(1), batch(2)
    moves = {}
    for precision in ("fp32", "bf16"):
        trainer = trainer_for(precision=precision, generator_lr=1e-2)
        before = flat(dict(trainer.loss_generator.named_parameters())).detach().clone()
        stats = trainer.meta_step(meta_train, meta_test)
        assert stats["skipped"] == 0.0
        moves[precision] = flat(dict(trainer.loss_generator.named_parameters())).detach() - before
    assert cosine(moves["bf16"], moves["fp32"]) > 0.999  # measured 0.99996


@pytest.mark.parametrize("order", ["simultaneous", "sequential"])
def test_bf16_fusion_step_losses_are_close_to_float32(order):
    stats = {
        precision: trainer_for(precision=precision, fusion_step_order=order).fusion_step(batch(3))
        for precision in ("fp32", "bf16")
    }
    for key in ("fusion_loss", "task_loss"):
        # measured relative differences: 4.2e-5 (fusion loss), 3.5e-5 (task loss)
        assert stats["bf16"][key] == pytest.approx(stats["fp32"][key], rel=1e-3)
    assert stats["bf16"]["skipped"] == 0.0


def test_parameters_gradients_and_optimiser_states_stay_float32():
    trainer = trainer_for(precision="bf16")
    trainer.meta_step(batch(1), batch(2))
    trainer.fusion_step(batch(3))
    modules = (trainer.fusion_model, trainer.loss_generator, trainer.task_loss)
    for module in modules:
        for param in module.parameters():
            assert param.dtype == torch.float32
            assert param.grad is None or param.grad.dtype == torch.float32
    for optimizer in trainer.optimizers.values():
        for tensor in tensors_of(optimizer.state_dict()["state"]):
            assert tensor.dtype == torch.float32 or not tensor.is_floating_point()


class RecordingFusionLoss(LearnableFusionLoss):
    """Records the dtypes it is given and whether autocast is on when it runs."""

    def __init__(self) -> None:
        super().__init__(alpha=1.0)
        self.seen: list[tuple[torch.dtype, torch.dtype, bool]] = []

    def terms(self, fused, a, b, weights):
        self.seen.append((fused.dtype, weights.dtype, torch.is_autocast_enabled("cpu")))
        return super().terms(fused, a, b, weights)


class RecordingSegmentation(TinySegmentation):
    """Records whether T's forward runs under autocast, and the dtype of what it is fed."""

    seen: list[tuple[torch.dtype, bool]]

    def forward(self, fused, masks):
        type(self).seen.append((fused.dtype, torch.is_autocast_enabled("cpu")))
        return super().forward(fused, masks)


def test_losses_are_float32_and_the_networks_run_under_autocast():
    fusion_loss = RecordingFusionLoss()
    RecordingSegmentation.seen = []
    for method in ("forward", "backprop"):
        torch.manual_seed(0)
        trainer = MetaFusionTrainer(
            TinyFusion(),
            RecordingSegmentation(),
            TinyGenerator(),
            fusion_loss,
            precision="bf16",
            hypergradient_method=method,
            device="cpu",
        )
        trainer.meta_step(batch(1), batch(2))
        trainer.fusion_step(batch(3))
    assert fusion_loss.seen and set(fusion_loss.seen) == {(torch.float32, torch.float32, False)}
    assert set(RecordingSegmentation.seen) == {(torch.float32, True)}

    fixed_task_inputs = []

    def fixed_task(fused, target):
        fixed_task_inputs.append((fused.dtype, torch.is_autocast_enabled("cpu")))
        return F.mse_loss(fused, target)

    trainer = MetaFusionTrainer(
        TinyFusion(), fixed_task, TinyGenerator(), precision="bf16", device="cpu"
    )
    trainer.meta_step(batch(1, task="callable"), batch(2, task="callable"))
    assert set(fixed_task_inputs) == {(torch.float32, False)}  # a task function: float32


def test_forward_mode_derivative_runs_under_bf16_autocast() -> None:
    # Dual tensors (torch.autograd.forward_ad) take ReFusionNet's derivative in bf16, layer
    # norm included; no float32 fall-back is needed.
    from tdfusion import LossGenerator
    from tdfusion.nets import ReFusionNet

    meta_train, meta_test = batch(1, task="callable"), batch(2, task="callable")
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        trainer = MetaFusionTrainer(
            ReFusionNet(dim=8, num_blocks=1, num_heads=2),
            reconstruct_a,
            LossGenerator(dim=8, num_blocks=1, num_heads=2),
            precision=precision,
            hypergradient_method="forward",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fall-back to backprop
            results[precision] = flat(trainer.hypergradient(meta_train, meta_test))
        assert trainer.autocast.learned == {}
    assert cosine(results["bf16"], results["fp32"]) > 0.999  # measured 0.999976


def test_forward_mode_falls_back_to_float32_where_autocast_breaks_it() -> None:
    autocast = Autocast("bf16", "cpu")
    calls = []

    def fails_under_autocast(x: torch.Tensor) -> torch.Tensor:
        calls.append(torch.is_autocast_enabled("cpu"))
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("no forward-mode rule under autocast")
        return x * x

    x, direction = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])
    for _ in range(2):
        output, tangent = autocast.jvp(fails_under_autocast, (x,), (direction,))
        assert torch.equal(output, x * x) and torch.equal(tangent, 2 * x)
    assert autocast.learned == {"jvp_float32": True}
    assert calls == [True, False, False]  # the failure is remembered


def test_forward_derivative_equals_torch_func_jvp() -> None:
    torch.manual_seed(0)
    weight = torch.randn(3, 3, dtype=torch.float64)
    primals = (torch.randn(4, 3, dtype=torch.float64), weight)
    tangents = tuple(torch.randn_like(p) for p in primals)

    def function(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w).sum(dim=1)

    expected = torch.func.jvp(function, primals, tangents)
    actual = forward_derivative(function, primals, tangents)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)
    constant = forward_derivative(lambda x, w: torch.ones(2), primals, tangents)
    assert torch.equal(constant[1], torch.zeros(2))


def test_mixed_precision_needs_float32_parameters_and_a_known_name():
    with pytest.raises(ValueError, match="needs float32 parameters"):
        MetaFusionTrainer(TinyFusion().double(), reconstruct_a, precision="bf16", device="cpu")
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16', 'fp16'"):
        trainer_for(precision="fp8")
    check_precision("fp32", torch.float64)  # float32 runs any dtype


# ---------------------------------------------------------------------- fp16
def test_fp16_meta_steps_are_refused_with_a_pointer_to_bf16():
    trainer = trainer_for(precision="fp16")
    before = full_state(trainer)
    for call in (trainer.meta_step, trainer.hypergradient, trainer.meta_loss):
        with pytest.raises(ValueError, match="precision='bf16'"):
            call(batch(1), batch(2))
    assert_same_state(before, full_state(trainer))


def test_fp16_fusion_steps_scale_the_losses():
    stats = {p: trainer_for(precision=p).fusion_step(batch(3)) for p in ("fp32", "fp16")}
    for key in ("fusion_loss", "task_loss"):
        assert stats["fp16"][key] == pytest.approx(stats["fp32"][key], rel=1e-3)
    trainer = trainer_for(precision="fp16")
    assert trainer.loss_scaler.enabled and trainer_for().loss_scaler.enabled is False
    trainer.fusion_step(batch(3))
    assert trainer.loss_scaler.scaler.get_scale() == 2.0**16  # no overflow: kept
    assert all(p.dtype == torch.float32 for p in trainer.fusion_model.parameters())


@pytest.mark.parametrize("order", ["simultaneous", "sequential"])
def test_an_fp16_overflow_skips_the_step_and_halves_the_scale(order):
    trainer = trainer_for(precision="fp16", fusion_step_order=order, on_nonfinite="raise")
    trainer.fusion_step(batch(3))  # optimiser states exist
    scaler_state = trainer.loss_scaler.state_dict()
    trainer.loss_scaler.load_state_dict({**scaler_state, "scale": 2.0**127})  # loss * scale: inf
    before = full_state(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow is no non-finite event: no warning
        stats = trainer.fusion_step(batch(4))
    assert stats["skipped"] == 1.0
    assert_same_state(before, full_state(trainer))
    assert trainer.loss_scaler.scaler.get_scale() == 2.0**126
    trainer.loss_scaler.load_state_dict(scaler_state)
    assert trainer.fusion_step(batch(4))["skipped"] == 0.0  # a step at a sane scale goes ahead


def test_fp16_needs_no_meta_steps_in_a_recipe():
    recipe = RECIPES["msrs-segmentation"].replace(precision="fp16", task_size=(32, 32))
    with pytest.raises(DataError, match="precision 'bf16'"):
        build_trainer(recipe, device="cpu")


# ---------------------------------------------------------------------- compile
class Exploding(nn.Module):
    """What the patched torch.compile returns: a module whose call raises."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args):
        raise RuntimeError("no compiler here")


def fusion_step_results(trainer: MetaFusionTrainer) -> dict:
    stats = trainer.fusion_step(batch(3))
    modules = (trainer.fusion_model, trainer.loss_generator, trainer.task_loss)
    return {"stats": stats, "state": [m.state_dict() for m in modules]}


def assert_close_results(got: dict, expected: dict, tolerance: float) -> None:
    for key in ("fusion_loss", "task_loss", "weight_a_mean"):
        assert got["stats"][key] == pytest.approx(expected["stats"][key], abs=tolerance)
    for got_state, expected_state in zip(got["state"], expected["state"]):
        for name, value in expected_state.items():
            torch.testing.assert_close(got_state[name], value, atol=tolerance, rtol=0)


def test_a_failing_compile_warns_once_per_network_and_runs_eagerly(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **options: Exploding(module))
    expected = fusion_step_results(trainer_for())
    trainer = trainer_for(compile=True)
    with pytest.warns(RuntimeWarning) as caught:
        got = fusion_step_results(trainer)
    messages = sorted(str(w.message) for w in caught)
    assert messages == [
        f"torch.compile of the {role} failed (RuntimeError: no compiler here); it runs uncompiled"
        for role in ("fusion network (TinyFusion)", "loss generator (TinyGenerator)",
                     "task network (TinySegmentation)")
    ]  # fmt: skip
    assert_close_results(got, expected, tolerance=0.0)  # the same computation
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        trainer.fusion_step(batch(4))
    assert {call.compiled for call in trainer._calls.values()} == {False}


def test_a_missing_torch_compile_is_a_warning(monkeypatch):
    monkeypatch.delattr(torch, "compile")
    with pytest.warns(RuntimeWarning, match="torch.compile is not available"):
        trainer_for("callable", compile=True).fusion_step(batch(3, task="callable"))


class BackwardFails(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward compiler failed")


def test_a_compiled_backward_that_fails_is_caught_at_the_first_call(monkeypatch):
    # torch.compile "works", but the backward through its result fails.
    monkeypatch.setattr(
        torch, "compile", lambda module, **_: lambda *a: BackwardFails.apply(module(*a))
    )
    net = TinyFusion()
    call = CompiledCall(net, "the fusion network", enabled=True)
    a = torch.rand(1, 1, 8, 8)
    with pytest.warns(RuntimeWarning, match="backward compiler failed"):
        fused = call(a, a)
    assert call.compiled is False
    fused.sum().backward()  # the eager output back-propagates
    assert net.conv1.weight.grad is not None


def inductor_usable() -> bool:
    return shutil.which("gcc") is not None or shutil.which("cc") is not None


@pytest.mark.slow
@pytest.mark.skipif(not inductor_usable(), reason="torch.compile's inductor needs a C compiler")
def test_compile_on_the_cpu_gives_eager_results_and_plain_checkpoint_keys(tmp_path):
    # SGD, not Adam: Adam's first step is lr * sign(g), and T's convolution bias before its
    # batch norm has a gradient that is rounding noise (different in compiled code).
    expected = fusion_step_results(trainer_for(optimizer="sgd"))
    trainer = trainer_for(compile=True, optimizer="sgd")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fall-back
        got = fusion_step_results(trainer)
    assert {call.compiled for call in trainer._calls.values()} == {True}
    assert_close_results(got, expected, tolerance=1e-5)
    trainer.meta_step(batch(1), batch(2))  # the meta step runs uncompiled
    trainer.save(tmp_path / "trainer.pt")
    checkpoint = torch.load(tmp_path / "trainer.pt", weights_only=True)
    keys = [key for state in checkpoint["models"].values() for key in state]
    assert keys and not [key for key in keys if "_orig_mod" in key]
    assert checkpoint["config"]["compile"] is True


# ---------------------------------------------------------------------- channels-last
@pytest.mark.parametrize("task", ["callable", "module"])
def test_channels_last_gives_the_default_results(task):
    meta_train, meta_test = batch(1, task=task), batch(2, task=task)
    results = {}
    for channels_last in (False, True):
        trainer = trainer_for(task, channels_last=channels_last)
        hypergradient = flat(trainer.hypergradient(meta_train, meta_test))
        stats = trainer.fusion_step(batch(3, task=task))
        results[channels_last] = (hypergradient, stats, trainer)
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=0)
    for key in ("fusion_loss", "weight_a_mean"):
        assert results[True][1][key] == pytest.approx(results[False][1][key], abs=1e-5)
    trainer = results[True][2]
    assert trainer.fusion_model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.loss_generator.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    expected = results[False][2].fusion_model.state_dict()
    for name, value in trainer.fusion_model.state_dict().items():  # after one fusion step
        torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=0)


def test_channels_last_batches_have_channels_last_memory():
    from tdfusion.trainer.batches import BatchPreparer

    a = torch.rand(2, 3, 8, 8)
    prepare = BatchPreparer(torch.device("cpu"), torch.float32, None, channels_last=True)
    assert prepare((a, a, None), "batch")[0].is_contiguous(memory_format=torch.channels_last)
    plain = BatchPreparer(torch.device("cpu"), torch.float32)
    assert plain((a, a, None), "batch")[0].is_contiguous()


# ---------------------------------------------------------------------- checkpoints, resume
def loader() -> DataLoader:
    a, b, masks = batch(5, size=(12, 12), n=8)
    return DataLoader(TensorDataset(a, b, masks), batch_size=2, shuffle=True)


def test_the_options_are_saved_and_load_uses_them(tmp_path):
    trainer = trainer_for(precision="bf16", channels_last=True)
    trainer.fusion_step(batch(3))
    trainer.save(tmp_path / "trainer.pt")
    loaded = MetaFusionTrainer.load(
        tmp_path / "trainer.pt", TinyFusion(), TinySegmentation(), TinyGenerator()
    )
    assert (loaded.precision, loaded.compile, loaded.channels_last) == ("bf16", False, True)
    assert loaded.autocast == Autocast("bf16", "cpu")


def test_the_fp16_scaler_state_is_saved_and_restored_on_resume(tmp_path):
    trainer = trainer_for(precision="fp16")
    trainer.fit(loader(), epochs=1, meta_steps=0, checkpoint=tmp_path / "c.pt", progress=False)
    state = trainer.loss_scaler.state_dict()
    trainer.loss_scaler.load_state_dict({**state, "scale": 512.0})
    trainer.save(tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["grad_scaler"]["scale"] == 512.0
    resumed = trainer_for(precision="fp16")
    resumed.fit(loader(), epochs=2, meta_steps=0, resume=tmp_path / "c.pt", progress=False)
    assert resumed.epoch == 2
    assert resumed.loss_scaler.scaler.get_scale() == 512.0  # restored (no overflow since)


def test_resuming_with_other_options_warns(tmp_path):
    trainer = trainer_for(precision="bf16")
    trainer.fit(loader(), epochs=1, meta_steps=1, checkpoint=tmp_path / "c.pt", progress=False)
    with pytest.warns(UserWarning, match=r"precision='bf16' -> 'fp32'.*continues with"):
        trainer_for().fit(
            loader(), epochs=2, meta_steps=1, resume=tmp_path / "c.pt", progress=False
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        same = trainer_for(precision="bf16")
        same.fit(loader(), epochs=2, meta_steps=1, resume=tmp_path / "c.pt", progress=False)
    assert same.epoch == 2


# ---------------------------------------------------------------------- recipe and CLI
def test_the_command_line_takes_the_options(monkeypatch, tmp_path):
    args = build_parser().parse_args(
        ["train", "--recipe", "msrs-segmentation", "--precision", "bf16", "--compile",
         "--channels-last"]
    )  # fmt: skip
    assert (args.precision, args.compile, args.channels_last) == ("bf16", True, True)
    args = build_parser().parse_args(["train", "--recipe", "msrs-segmentation"])
    assert (args.precision, args.compile, args.channels_last) == (None, None, None)

    import tdfusion.recipes

    seen = {}

    def fake_train(recipe, data_root, out, **kwargs):
        seen["recipe"] = recipe
        raise DataError("stop here")

    monkeypatch.setattr(tdfusion.recipes, "train", fake_train)
    arguments = ["train", "--recipe", "roadscene-pretrain", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "out"), "--precision", "fp16",
                 "--channels-last"]  # fmt: skip
    assert main(arguments) == 2
    recipe = seen["recipe"]
    assert (recipe.precision, recipe.compile, recipe.channels_last) == ("fp16", False, True)


def test_an_unknown_precision_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--recipe", "msrs-segmentation", "--precision", "fp8"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "--precision: invalid choice" in error


def test_a_recipe_builds_its_trainer_with_the_options():
    recipe = RECIPES["roadscene-pretrain"].replace(precision="bf16", channels_last=True)
    trainer = build_trainer(recipe, device="cpu")
    assert (trainer.precision, trainer.channels_last, trainer.compile) == ("bf16", True, False)
    assert trainer.config()["precision"] == "bf16"
