"""``recipes.train`` into a folder that holds an earlier run: resume, refuse or start over."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tdfusion.cli import main
from tdfusion.errors import DataError
from tdfusion.nets import ReFusionNet
from tdfusion.recipes import RECIPES, NothingToTrainWarning, load_recipe, make_smoke_dataset, train
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


def test_a_checkpoint_without_recipe_json_is_not_resumed(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    train(TINY, data_root, out, device="cpu", progress=False)
    (out / "recipe.json").unlink()
    before = (out / "checkpoint.pt").read_bytes()
    # Its batch size cannot be checked: the checkpoint does not hold it.
    with pytest.raises(DataError) as refused:
        train(TINY.replace(batch_size=2), data_root, out, device="cpu", progress=False)
    message = str(refused.value)
    assert f"{out / 'checkpoint.pt'} has no recipe.json beside it" in message
    assert "--no-resume" in message and len(message.splitlines()) == 1
    assert (out / "checkpoint.pt").read_bytes() == before and not (out / "recipe.json").exists()
    arguments = ["train", "--recipe", "roadscene-pretrain", "--smoke", "--device", "cpu"]
    assert main([*arguments, "--out", str(out), "--batch-size", "4"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "has no recipe.json beside it" in error
    # Starting over is the way out.
    train(TINY.replace(batch_size=2), data_root, out, device="cpu", resume=False, progress=False)
    assert json.loads((out / "recipe.json").read_text())["batch_size"] == 2


def test_a_resume_neither_compares_nor_rewrites_init_weights(data_root, tmp_path):
    weights = tmp_path / "stage1.pt"
    ReFusionNet().save_pretrained(weights)
    out = tmp_path / "run"
    train(TINY.replace(init_weights=str(weights)), data_root, out, device="cpu", progress=False)
    for epochs, init_weights in ((2, "elsewhere/fusion_model.pt"), (3, None)):
        resumed = TINY.replace(epochs=epochs, init_weights=init_weights)
        trainer = train(resumed, data_root, out, device="cpu", progress=False)
        assert trainer.epoch == epochs == checkpoint_epoch(out)
        saved = json.loads((out / "recipe.json").read_text())
        assert (saved["epochs"], saved["init_weights"]) == (epochs, str(weights))
    # Every other setting is still compared.
    with pytest.raises(DataError, match="seed 0 -> 4"):
        train(TINY.replace(epochs=4, seed=4), data_root, out, device="cpu", progress=False)


def test_a_rerun_with_fewer_epochs_trains_and_writes_nothing(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    arguments = ["train", "--recipe", "roadscene-pretrain", "--smoke", "--device", "cpu"]
    arguments += ["--out", str(out), "--data-root", str(data_root)]
    assert main([*arguments, "--epochs", "2"]) == 0
    capsys.readouterr()
    written = {name: (out / name).read_bytes() for name in ("recipe.json", "checkpoint.pt")}
    written["fusion_model.pt"] = (out / "fusion_model.pt").read_bytes()
    for epochs in ("1", "2"):
        assert main([*arguments, "--epochs", epochs]) == 0
        captured = capsys.readouterr()
        assert captured.out == (
            f"nothing to train: {out} is at epoch 2, --epochs {epochs}; pass a larger --epochs "
            "to train further\n"
        )
        assert captured.err == ""
        assert {name: (out / name).read_bytes() for name in written} == written
    # The library warns and returns the trainer at the checkpoint's epoch.
    recipe = load_recipe(config=out / "recipe.json", epochs=1)
    with pytest.warns(NothingToTrainWarning, match="nothing to train: .* is at epoch 2, epochs=1"):
        trainer = train(recipe, data_root, out, device="cpu", progress=False)
    assert trainer.epoch == 2 and (out / "recipe.json").read_bytes() == written["recipe.json"]


def test_an_image_that_fails_to_decode_mid_run_is_named_and_the_run_resumes(data_root, tmp_path):
    out = tmp_path / "run"
    recipe = TINY.replace(num_workers=1, fusion_steps=1)
    train(recipe, data_root, out, device="cpu", progress=False)
    # A truncated JPEG passes the header check: it fails when a worker decodes it, in epoch 2.
    for path in sorted((data_root / "ir").iterdir()):
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) * 2 // 3])
        (tmp_path / path.name).write_bytes(whole)
    with pytest.raises(DataError) as stopped:
        train(recipe.replace(epochs=2), data_root, out, device="cpu", progress=False)
    message = str(stopped.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"cannot read image {data_root / 'ir'}")
    assert f"{out / 'checkpoint.pt'} (epoch 1) is kept" in message
    assert checkpoint_epoch(out) == 1
    for path in sorted((data_root / "ir").iterdir()):
        path.write_bytes((tmp_path / path.name).read_bytes())
    trainer = train(recipe.replace(epochs=2), data_root, out, device="cpu", progress=False)
    assert trainer.epoch == 2 and checkpoint_epoch(out) == 2
