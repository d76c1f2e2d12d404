"""``recipes.train`` into a folder that holds an earlier run: resume, refuse or start over."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tdfusion.errors import DataError
from tdfusion.nets import ReFusionNet
from tdfusion.recipes import RECIPES, make_smoke_dataset, train
from tdfusion.trainer.trainer import MetaFusionTrainer

#: Two fusion steps of one pair on 32x32 crops: a run takes a second or two.
TINY = RECIPES["roadscene-pretrain"].replace(epochs=1, fusion_steps=2, batch_size=1, data_crop=32)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    return make_smoke_dataset(TINY, tmp_path / "data")


def checkpoint_epoch(out: Path) -> int:
    return torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]


def logged(out: Path) -> list[tuple[str, str, str]]:
    with (out / "training_log.csv").open() as stream:
        return [(r["epoch"], r["global_step"], r["fusion_lr"]) for r in csv.DictReader(stream)]


def test_a_resume_with_other_settings_is_refused_and_leaves_the_folder(data_root, tmp_path):
    out = tmp_path / "run"
    train(TINY, data_root, out, device="cpu", progress=False)
    saved = (out / "recipe.json").read_bytes()
    with pytest.raises(DataError) as refused:
        train(TINY.replace(epochs=2, lr=5e-4), data_root, out, device="cpu", progress=False)
    message = str(refused.value)
    assert "lr 0.001 -> 0.0005" in message and "epochs" not in message.split(". ")[0]
    assert str(out / "recipe.json") in message and "--no-resume" in message
    assert (out / "recipe.json").read_bytes() == saved
    assert checkpoint_epoch(out) == 1 and len(logged(out)) == 2

    other = RECIPES["msrs-segmentation"].replace(epochs=1, task_size=(96, 128))
    with pytest.raises(DataError, match="name 'roadscene-pretrain' -> 'msrs-segmentation'"):
        train(other, data_root, out, device="cpu", progress=False)
    assert (out / "recipe.json").read_bytes() == saved


def test_an_epochs_only_change_resumes_and_updates_recipe_json(data_root, tmp_path):
    out = tmp_path / "run"
    train(TINY, data_root, out, device="cpu", progress=False)
    trainer = train(TINY.replace(epochs=2), data_root, out, device="cpu", progress=False)
    assert trainer.epoch == 2 and checkpoint_epoch(out) == 2
    assert json.loads((out / "recipe.json").read_text())["epochs"] == 2
    assert [row[:2] for row in logged(out)] == [("0", "0"), ("0", "1"), ("1", "2"), ("1", "3")]


def test_no_resume_deletes_the_earlier_run_before_training(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(TINY, data_root, out, device="cpu", progress=False)
    (out / "loss_generator.pt").write_bytes(b"an earlier run's generator")
    original = MetaFusionTrainer.fusion_step
    calls = []

    def interrupted(self, batch):
        calls.append(batch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(MetaFusionTrainer, "fusion_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(TINY.replace(lr=5e-4), data_root, out, device="cpu", resume=False, progress=False)
    monkeypatch.setattr(MetaFusionTrainer, "fusion_step", original)
    for name in ("checkpoint.pt", "fusion_model.pt", "loss_generator.pt"):
        assert not (out / name).exists(), name
    # A plain rerun starts over instead of resuming the first run's checkpoint.
    trainer = train(TINY.replace(epochs=2), data_root, out, device="cpu", progress=False)
    assert trainer.epoch == 2
    assert logged(out) == [
        ("0", "0", "0.001"),
        ("0", "1", "0.001"),
        ("1", "2", "0.001"),
        ("1", "3", "0.001"),
    ]


def test_a_resumed_run_does_not_read_init_weights(data_root, tmp_path):
    weights = tmp_path / "stage1.pt"
    torch.manual_seed(0)
    ReFusionNet(dim=8, num_blocks=1, num_heads=2).save_pretrained(weights)
    recipe = TINY.replace(init_weights=str(weights))
    out = tmp_path / "run"
    train(recipe, data_root, out, device="cpu", progress=False)
    weights.unlink()
    trainer = train(recipe.replace(epochs=2), data_root, out, device="cpu", progress=False)
    assert trainer.epoch == 2 and checkpoint_epoch(out) == 2
    # The network has the checkpoint's architecture (that of the init weights).
    assert ReFusionNet.from_pretrained(out / "fusion_model.pt").config["dim"] == 8
    # A fresh start still needs them, and says so.
    with pytest.raises(DataError, match="init_weights: checkpoint .*stage1.pt' not found"):
        train(recipe, data_root, tmp_path / "fresh", device="cpu", progress=False)
    assert not (tmp_path / "fresh").exists()
