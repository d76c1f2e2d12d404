"""MetaFusionTrainer: what resume and load keep consistent, and the loop's argument checks."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from test_trainer import (
    TinyFusion,
    TinySegmentation,
    make_batch,
    make_trainer,
    segmentation_loader,
)
from torch.utils.data import DataLoader, TensorDataset

from tdfusion import MetaFusionTrainer
from tdfusion.errors import CheckpointError
from tdfusion.nets import FixedLossWeights


def step_lr(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.StepLR:
    return torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)


def trained_checkpoint(path, **kwargs) -> MetaFusionTrainer:
    trainer = make_trainer("module", **kwargs)
    trainer.fit(segmentation_loader(), 1, 0, checkpoint=path, progress=False)
    return trainer


def load_tiny(path, **overrides) -> MetaFusionTrainer:
    """``MetaFusionTrainer.load`` of a ``trained_checkpoint`` with fresh tiny networks."""
    return MetaFusionTrainer.load(
        path,
        TinyFusion().double(),
        TinySegmentation().double(),
        loss_generator=make_trainer("module").loss_generator,
        **overrides,
    )


def test_resuming_with_other_learning_rates_names_each_setting(tmp_path):
    trained_checkpoint(tmp_path / "c.pt", fusion_lr=1e-4)
    resumed = make_trainer("module", fusion_lr=1e-3, generator_lr=5e-3)
    with pytest.raises(CheckpointError) as caught:
        resumed.fit(segmentation_loader(), 2, 0, resume=tmp_path / "c.pt", progress=False)
    message = str(caught.value)
    assert "c.pt" in message and "MetaFusionTrainer.load" in message
    assert "fusion_lr 0.0001 -> 0.001" in message and "generator_lr 0.0001 -> 0.005" in message
    assert "task_lr" not in message.replace("task_inner_lr", "")


def test_load_with_a_new_learning_rate_applies_it_at_the_schedule_position(tmp_path):
    trained_checkpoint(tmp_path / "c.pt", fusion_lr=1e-4, lr_scheduler=step_lr)
    loaded = load_tiny(tmp_path / "c.pt", fusion_lr=1e-3, lr_scheduler=step_lr)
    group = loaded.fusion_optimizer.param_groups[0]
    # One epoch of StepLR(1, 0.5): half of the new rate, and the inner step at half size.
    assert group["initial_lr"] == pytest.approx(1e-3)
    assert group["lr"] == pytest.approx(0.5e-3)
    assert loaded.lr_scale == pytest.approx(0.5)
    assert loaded.schedulers["fusion"].base_lrs == [pytest.approx(1e-3)]
    assert loaded.config()["fusion_lr"] == pytest.approx(1e-3)
    loaded.schedulers["fusion"].step()
    assert group["lr"] == pytest.approx(0.25e-3)


def test_load_with_a_new_learning_rate_without_a_schedule(tmp_path):
    trained_checkpoint(tmp_path / "c.pt", fusion_lr=1e-4, task_lr=1e-4)
    loaded = load_tiny(tmp_path / "c.pt", fusion_lr=1e-3, task_lr=2e-3)
    assert loaded.fusion_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert loaded.task_optimizer.param_groups[0]["lr"] == pytest.approx(2e-3)
    assert loaded.lr_scale == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("saved", "resumed", "names"),
    [
        ({"optimizer": "adam"}, {"optimizer": "sgd"}, "optimizer='adam' (this trainer: 'sgd')"),
        ({"optimizer": "sgd"}, {"optimizer": "adam"}, "optimizer='sgd' (this trainer: 'adam')"),
        (
            {"generator_update": "normalized"},
            {"generator_update": "optimizer"},
            "generator_update='normalized' (this trainer: 'optimizer')",
        ),
    ],
)
def test_resuming_with_another_optimizer_is_a_checkpoint_error(tmp_path, saved, resumed, names):
    trained_checkpoint(tmp_path / "c.pt", **saved)
    with pytest.raises(CheckpointError, match=r"c\.pt was trained with .*") as caught:
        make_trainer("module", **resumed).fit(
            segmentation_loader(), 2, 0, resume=tmp_path / "c.pt", progress=False
        )
    assert names in str(caught.value)


def test_an_optimizer_factory_of_another_kind_is_a_checkpoint_error(tmp_path):
    trained_checkpoint(tmp_path / "c.pt", optimizer="adam")
    factory = lambda parameters, lr: torch.optim.SGD(parameters, lr=lr)  # noqa: E731
    with pytest.raises(CheckpointError, match="optimiser state of another kind.*momentum"):
        make_trainer("module", optimizer=factory).fit(
            segmentation_loader(), 2, 0, resume=tmp_path / "c.pt", progress=False
        )


def test_skipped_steps_are_left_out_of_the_epoch_means(tmp_path):
    a, b, masks = make_batch(0, n=8, size=(12, 12))
    a[7, 0, 0, 0] = float("nan")  # one bad pixel in the last of four batches
    data = DataLoader(TensorDataset(a, b, masks), batch_size=2, shuffle=False)
    trainer = make_trainer("module", on_nonfinite="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history = trainer.fit(data, 1, 0, checkpoint=tmp_path / "c.pt", progress=False)
    summary = history[0]
    assert summary["fusion_steps"] == 4 and summary["skipped"] == 1
    assert math.isfinite(summary["fusion_loss"]) and math.isfinite(summary["task_loss"])
    saved = torch.load(tmp_path / "c.pt", weights_only=True)["history"][0]
    assert math.isfinite(saved["fusion_loss"]) and saved["skipped"] == 1


@pytest.mark.filterwarnings("ignore:nothing to train")
def test_a_dropped_schedule_warns_on_load_and_resume(tmp_path):
    trained_checkpoint(tmp_path / "c.pt", lr_scheduler=step_lr)
    with pytest.warns(UserWarning, match=r"holds learning-rate schedules .* no lr_scheduler"):
        loaded = MetaFusionTrainer.load(
            tmp_path / "c.pt",
            TinyFusion().double(),
            TinySegmentation().double(),
            loss_generator=make_trainer("module").loss_generator,
        )
    assert loaded.lr_scale == pytest.approx(0.5)  # the inner step keeps the saved schedule's
    with pytest.warns(UserWarning, match="no lr_scheduler for them: they are dropped"):
        make_trainer("module").fit(
            segmentation_loader(), 1, 0, resume=tmp_path / "c.pt", progress=False
        )


@pytest.mark.filterwarnings("ignore:nothing to train")
def test_a_schedule_resuming_a_checkpoint_without_one_warns_that_it_restarts(tmp_path):
    trained_checkpoint(tmp_path / "c.pt")
    with pytest.warns(UserWarning, match="starts from its beginning"):
        make_trainer("module", lr_scheduler=step_lr).fit(
            segmentation_loader(), 1, 0, resume=tmp_path / "c.pt", progress=False
        )


def test_load_rebuilds_fixed_loss_weights(tmp_path):
    trainer = MetaFusionTrainer(
        TinyFusion().double(),
        TinySegmentation().double(),
        FixedLossWeights("max_intensity"),
        device="cpu",
    )
    trainer.save(tmp_path / "c.pt")
    loaded = MetaFusionTrainer.load(
        tmp_path / "c.pt", TinyFusion().double(), TinySegmentation().double()
    )
    assert isinstance(loaded.loss_generator, FixedLossWeights)
    assert loaded.loss_generator.rule == "max_intensity"


def test_an_old_checkpoint_with_fixed_loss_weights_says_what_to_pass(tmp_path):
    trainer = MetaFusionTrainer(
        TinyFusion().double(), TinySegmentation().double(), FixedLossWeights(), device="cpu"
    )
    state = trainer.state_dict()
    state["model_configs"]["loss_generator"] = None  # as written before the rule was saved
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match=r"fixed loss weights.*FixedLossWeights\(\.\.\.\)"):
        MetaFusionTrainer.load(tmp_path / "old.pt", TinyFusion().double(), TinySegmentation())


def test_a_one_shot_iterator_is_refused():
    batches = list(segmentation_loader())
    with pytest.raises(TypeError, match="one-shot iterator .*re-iterable"):
        make_trainer("module").fit((b for b in batches), 2, 0, progress=False)
    history = make_trainer("module").fit(batches, 1, 1, progress=False)  # a list is fine
    assert history[0]["fusion_steps"] == 4


def test_a_checkpoint_naming_a_directory_is_refused_before_training(tmp_path):
    (tmp_path / "runs").mkdir()
    trainer = make_trainer("module")
    with pytest.raises(CheckpointError, match="is a directory"):
        trainer.fit(segmentation_loader(), 1, 0, checkpoint=tmp_path / "runs", progress=False)
    assert trainer.global_step == 0


def test_negative_fusion_steps_are_refused():
    trainer = make_trainer("module")
    with pytest.raises(ValueError, match="fusion_steps must be >= 0"):
        trainer.fit(segmentation_loader(), 1, 0, fusion_steps=-1, progress=False)
    assert trainer.global_step == 0


def test_reduce_on_plateau_is_refused_when_the_trainer_is_built():
    with pytest.raises(TypeError, match="ReduceLROnPlateau"):
        make_trainer("module", lr_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau)


class MaskedSegmentation(TinySegmentation):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.tensor([0.0, float("-inf")], dtype=torch.float64))


def test_a_buffer_holding_minus_infinity_is_checkpointed(tmp_path):
    torch.manual_seed(0)
    trainer = MetaFusionTrainer(TinyFusion().double(), MaskedSegmentation().double(), device="cpu")
    trainer.save(tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    assert saved["models"]["task"]["mask"][1] == float("-inf")


def test_a_symlinked_checkpoint_is_locked_as_its_target(tmp_path):
    from tdfusion.errors import OutputInUseError
    from tdfusion.files import output_lock

    (tmp_path / "real.pt").write_bytes(b"")
    os.symlink(tmp_path / "real.pt", tmp_path / "link.pt")
    with output_lock(tmp_path, "real.pt", purpose="training"), pytest.raises(OutputInUseError):
        make_trainer("module").fit(
            segmentation_loader(), 1, 0, checkpoint=tmp_path / "link.pt", progress=False
        )
