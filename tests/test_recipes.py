"""Recipes, ``tdfusion train`` and the examples' smoke runs, end to end on the bundled sample."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdfusion.cli import main
from tdfusion.errors import DataError
from tdfusion.recipes import (
    RECIPES,
    build_dataset,
    build_trainer,
    load_recipe,
    make_smoke_dataset,
)

REPO = Path(__file__).resolve().parents[1]


def test_paper_recipes_hold_the_paper_settings():
    msrs = RECIPES["msrs-segmentation"]
    assert (msrs.num_classes, msrs.task_size, msrs.fusion_crop) == (9, (240, 320), 256)
    assert (msrs.epochs, msrs.meta_steps, msrs.lr, msrs.batch_size, msrs.swap) == (
        50,
        200,
        1e-4,
        1,
        True,
    )
    assert RECIPES["fmb-segmentation"].task_size == (300, 400)
    assert RECIPES["m3fd-detection"].num_classes == 6
    assert RECIPES["llvip-detection"].stride == 10


def test_load_recipe_merges_config_and_overrides(tmp_path):
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"name": "m3fd-detection", "epochs": 3, "lr": 5e-4}))
    recipe = load_recipe(config=config, epochs=7, meta_steps=None)
    assert (recipe.name, recipe.epochs, recipe.lr, recipe.meta_steps) == (
        "m3fd-detection",
        7,
        5e-4,
        200,
    )
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(ValueError, match="unknown recipe settings"):
        load_recipe("m3fd-detection", colour="red")
    config.write_text("{not json")
    with pytest.raises(DataError, match="cannot read recipe config"):
        load_recipe(config=config)


def test_the_research_preset_sets_the_research_code_s_steps(tmp_path):
    recipe = RECIPES["msrs-segmentation"].replace(preset="research", weighting="linear")
    assert recipe.preset == "research" and recipe.weighting == "linear"  # explicit wins
    recipe = load_recipe("msrs-segmentation", preset="research", epochs=40)
    assert (recipe.weighting, recipe.task_inner_optimizer, recipe.label_resolution) == (
        "squared",
        "task_optimizer_persistent",
        "full",
    )
    # A --preset given with a config file overrides the file's settings.
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps(RECIPES["msrs-segmentation"].to_dict()))
    assert load_recipe(config=config, preset="research").fusion_step_order == "sequential"
    with pytest.raises(DataError, match="unknown preset"):
        load_recipe("msrs-segmentation", preset="paper")

    recipe = recipe.replace(task_size=(96, 128))
    trainer = build_trainer(recipe, device="cpu")
    assert trainer.fusion_loss.weighting == "squared"
    assert trainer.task_inner_step.persistent and trainer.fusion_step_order == "sequential"
    assert (trainer.task_loss.pad, trainer.task_loss.align_corners) == (False, True)
    default = build_trainer(RECIPES["msrs-segmentation"], device="cpu")
    assert default.config()["task_inner_optimizer"] == "sgd"
    assert (default.task_loss.pad, default.fusion_loss.weighting) == (True, "linear")
    # The masks stay at the dataset's size: the research code's label resolution.
    root = make_smoke_dataset(recipe, tmp_path / "data")
    a, _, masks = build_dataset(recipe, root)[0]
    assert masks.shape == a.shape[-2:]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_smoke_datasets_load_in_every_layout(name, tmp_path):
    recipe = RECIPES[name].replace(stride=1, task_size=(96, 128))
    root = make_smoke_dataset(recipe, tmp_path)
    dataset = build_dataset(recipe, root)
    a, b, target = dataset[0]
    assert a.shape == b.shape and a.shape[0] == 1
    if recipe.task == "segmentation":
        assert target.shape == (96, 128) and target.dtype == torch.int64 and target.max() > 0
    elif recipe.task == "detection":
        assert target.shape[1] == 5
    else:  # fusion pre-training: the target is the pair's name, the crop is the recipe's
        assert isinstance(target, str) and a.shape[-2:] == (recipe.data_crop, recipe.data_crop)


def run_example(script: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / script),
            "--smoke",
            "--out",
            str(out),
            "--device",
            "cpu",
            *extra,
        ],
        capture_output=True,
        text=True,
        env=environment,
        timeout=900,
    )


@pytest.mark.parametrize("script", ["msrs_segmentation.py", "m3fd_detection.py"])
def test_example_smoke_runs_end_to_end_and_resume(script, tmp_path):
    out = tmp_path / "run"
    first = run_example(script, out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "trained" in first.stdout
    for name in (
        "recipe.json",
        "checkpoint.pt",
        "training_log.csv",
        "fusion_model.pt",
        "loss_generator.pt",
    ):
        assert (out / name).is_file(), name
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    # Asking for a second epoch continues from the checkpoint instead of starting over.
    second = run_example(script, out, "--epochs", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    rows = (out / "training_log.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 3  # header, then 1 meta + 2 fusion steps per epoch


def test_train_needs_data_or_smoke(tmp_path, capsys):
    assert main(["train", "--recipe", "msrs-segmentation", "--out", str(tmp_path)]) == 2
    assert "--data-root is required" in capsys.readouterr().err
    code = main(
        [
            "train",
            "--recipe",
            "msrs-segmentation",
            "--data-root",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2 and "MSRS infrared folder" in capsys.readouterr().err


def test_custom_task_example_runs(tmp_path):
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "custom_task.py"), "1"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean w_a after training" in result.stdout
    assert len((REPO / "examples" / "custom_task.py").read_text().splitlines()) < 60


@pytest.mark.parametrize(
    "recipe, layout",
    [
        ("msrs-segmentation", "a msrs data root holds train/ir/, train/vi/ and"),
        ("fmb-segmentation", "a fmb data root holds train/Infrared/, train/Visible/"),
        ("m3fd-detection", "a m3fd data root holds Ir/, Vis/ and Annotation/"),
        ("llvip-detection", "a llvip data root holds infrared/train/, visible/train/"),
    ],
)
def test_a_failed_train_names_the_layout_and_leaves_no_folder(tmp_path, capsys, recipe, layout):
    out = tmp_path / "runs" / "first"
    (tmp_path / "data").mkdir()
    arguments = ["train", "--recipe", recipe, "--data-root", str(tmp_path / "data")]
    assert main([*arguments, "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and layout in error
    assert not (tmp_path / "runs").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    assert main([*arguments, "--out", str(existing)]) == 2
    assert existing.is_dir()  # a folder the run did not create stays


def test_a_second_training_into_the_same_folder_fails_with_one_line(tmp_path, capsys):
    from tdfusion.files import output_lock

    out = tmp_path / "run"
    with output_lock(out, purpose="training"):
        code = main(["train", "--recipe", "msrs-segmentation", "--smoke", "--out", str(out)])
    assert code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert f"output folder {out} is in use by another tdfusion process" in error
    assert not (out / "checkpoint.pt").exists()


def test_read_transform_adds_blur_and_noise_only_when_asked():
    from tdfusion.data import RandomBlur, RandomExposure, RandomNoise
    from tdfusion.recipe_tables import read_transform

    plain = RECIPES["roadscene-refine"]
    kinds = [type(t) for t in read_transform(plain).transforms]
    assert RandomExposure in kinds and RandomBlur not in kinds and RandomNoise not in kinds
    noisy = plain.replace(blur_augment=2.5, noise_augment=0.03)
    steps = read_transform(noisy).transforms
    # The extra steps come last, so the crops and darkening of the plain recipe are unchanged.
    assert [type(t) for t in steps] == [*kinds, RandomBlur, RandomNoise]
    assert steps[-2].max_sigma == 2.5 and steps[-2].index == 0
    assert steps[-1].max_sigma == 0.03 and steps[-1].index == 1
    # Blur touches only source a: b comes out of the same crop, flips and darkening (for the
    # first pair; the blur's draws shift those of the pairs after it).
    a = torch.rand(1, 200, 200, generator=torch.Generator().manual_seed(0))
    first = read_transform(plain)((a, a.clone(), "x"))
    again = read_transform(plain.replace(blur_augment=2.5))((a, a.clone(), "x"))
    assert torch.equal(first[1], again[1]) and first[1].shape == (1, 160, 160)


def test_read_transform_darkens_as_the_recipe_says():
    from tdfusion.data import RandomExposure
    from tdfusion.recipe_tables import read_transform

    plain = RECIPES["roadscene-refine"]
    (exposure,) = [t for t in read_transform(plain).transforms if isinstance(t, RandomExposure)]
    assert (exposure.low, exposure.p, exposure.max_gamma) == (0.25, 0.5, plain.exposure_gamma)
    dark = plain.replace(exposure_low=0.1, exposure_p=1.0)
    (exposure,) = [t for t in read_transform(dark).transforms if isinstance(t, RandomExposure)]
    assert (exposure.low, exposure.p) == (0.1, 1.0)
    # Every source is darkened: no crop comes out as bright as it went in.
    a = torch.full((1, 200, 200), 0.8)
    transform = read_transform(dark)
    for _ in range(5):
        out_a, out_b, _ = transform((a, a.clone(), "x"))
        assert float(out_a.max()) < 0.8 and float(out_b.max()) < 0.8


def _listed_recipes() -> list[str]:
    """The recipe names ``tdfusion train --help`` lists (the choices of ``--recipe``)."""
    from tdfusion.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    (recipe,) = [a for a in commands.choices["train"]._actions if a.dest == "recipe"]
    return list(recipe.choices)


@pytest.mark.parametrize("name", _listed_recipes())
def test_smoke_runs_every_listed_recipe(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/<earlier stage>/fusion_model.pt here
    out = tmp_path / "run"
    arguments = ["train", "--recipe", name, "--smoke", "--device", "cpu", "--fusion-steps", "1"]
    code = main([*arguments, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "trained" in captured.out and (out / "fusion_model.pt").is_file()
    saved = json.loads((out / "recipe.json").read_text())
    if RECIPES[name].init_weights is None:
        assert "smoke run" not in captured.out and saved["init_weights"] is None
    else:  # a later stage: the earlier stage's weights are absent, the bundled ones stand in
        assert (
            f"smoke run: init_weights {RECIPES[name].init_weights!r} not found (an earlier stage "
            "writes it); starting from the bundled 'tdfusion-ivif' weights\n"
        ) in captured.out
        assert saved["init_weights"] == "tdfusion-ivif"


def test_a_smoke_stage_starts_from_the_earlier_stage_s_weights_when_they_exist(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    arguments = ["--smoke", "--device", "cpu", "--fusion-steps", "1"]
    first = ["train", "--recipe", "roadscene-pretrain", "--out", "runs/roadscene-pretrain"]
    assert main([*first, *arguments]) == 0
    second = ["train", "--recipe", "roadscene-finetune", "--out", "runs/roadscene-finetune"]
    capsys.readouterr()
    assert main([*second, *arguments]) == 0
    assert "smoke run" not in capsys.readouterr().out
    saved = json.loads(Path("runs/roadscene-finetune/recipe.json").read_text())
    assert saved["init_weights"] == "runs/roadscene-pretrain/fusion_model.pt"
    # An explicit --init-weights that is absent is still an error.
    code = main([*second, *arguments, "--no-resume", "--init-weights", "absent.pt"])
    assert code == 2 and "init_weights: checkpoint 'absent.pt' not found" in capsys.readouterr().err
