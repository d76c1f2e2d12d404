"""FixedLossWeights: the fixed fusion-loss weightings, and training with them."""

from __future__ import annotations

import pytest
import torch

from tdfusion import LearnableFusionLoss, MetaFusionTrainer
from tdfusion.losses import intensity_loss
from tdfusion.nets import FixedLossWeights, ReFusionNet


def test_max_intensity_weights_make_the_brighter_source_the_target():
    a, b = torch.rand(2, 1, 9, 11), torch.rand(2, 1, 9, 11)
    fused = torch.rand(2, 1, 9, 11)
    weights = FixedLossWeights("max_intensity")(a, b)
    assert torch.equal(weights.sum(dim=1), torch.ones(2, 9, 11))
    expected = (fused - torch.maximum(a, b)).square().mean()
    assert torch.allclose(intensity_loss(fused, a, b, weights), expected)


def test_equal_weights_are_one_half():
    a, b = torch.rand(1, 1, 4, 5), torch.rand(1, 1, 4, 5)
    assert torch.equal(FixedLossWeights("equal")(a, b), torch.full((1, 2, 4, 5), 0.5))


@pytest.mark.parametrize(
    "rule, shapes, match",
    [
        ("median", None, "rule must be one of"),
        ("equal", ((1, 2, 4, 4), (1, 2, 4, 4)), "N, 1, H, W"),
    ],
)
def test_bad_rule_or_shapes_are_clear_errors(rule, shapes, match):
    with pytest.raises(ValueError, match=match):
        weights = FixedLossWeights(rule)
        weights(torch.rand(*shapes[0]), torch.rand(*shapes[1]))


def test_trainer_with_fixed_weights_trains_f_and_refuses_meta_steps():
    trainer = MetaFusionTrainer(
        ReFusionNet(dim=8),
        lambda fused, target: fused.mean() * 0.0,
        FixedLossWeights("max_intensity"),
        LearnableFusionLoss(),
        device="cpu",
        fusion_lr=1e-3,
    )
    assert trainer.generator_optimizer is None
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    before = [p.detach().clone() for p in trainer.fusion_model.parameters()]
    trainer.fit([(a, b, None), (b, a, None)], epochs=1, meta_steps=0, progress=False)
    changed = any(
        not torch.equal(old, new) for old, new in zip(before, trainer.fusion_model.parameters())
    )
    assert changed
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainer.meta_step((a, b, None), (b, a, None))
    # The checkpoint round trip works without a generator optimiser.
    trainer.load_state_dict(trainer.state_dict())


def test_the_loss_generator_of_a_fixed_weights_checkpoint_is_refused_by_name(tmp_path, capsys):
    from tdfusion.cli import main
    from tdfusion.errors import CheckpointError
    from tdfusion.nets import LossGenerator

    trainer = MetaFusionTrainer(
        ReFusionNet(dim=8),
        lambda fused, target: fused.mean() * 0.0,
        FixedLossWeights("max_intensity"),
        device="cpu",
    )
    path = tmp_path / "checkpoint.pt"
    trainer.save(path)
    with pytest.raises(CheckpointError, match="fixed loss weights .rule 'max_intensity'."):
        LossGenerator.from_pretrained(path)
    # the trainer itself still loads, fixed weights and all
    loaded = MetaFusionTrainer.load(path, ReFusionNet(dim=8), trainer.task_loss)
    assert isinstance(loaded.loss_generator, FixedLossWeights)
    # the command line says it in one line
    pairs = tmp_path / "pairs"
    arguments = ["weights", "--checkpoint", str(path), "--ir", str(pairs), "--vis", str(pairs)]
    assert main([*arguments, "--out", str(tmp_path / "maps")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "fixed loss weights" in error[0]
