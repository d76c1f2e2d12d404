"""Recipe settings are checked before training: names, types, ranges and combinations, each
refused with one line naming the setting; fusion-only recipes (``task="none"``) on every layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from tdfusion.cli import main
from tdfusion.errors import DataError
from tdfusion.recipes import RECIPES, build_dataset, load_recipe, make_smoke_dataset, train


def write_config(folder: Path, **settings) -> Path:
    path = folder / "recipe.json"
    path.write_text(json.dumps(settings))
    return path


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert error.startswith("tdfusion train: error: "), error
    return error


# ---------------------------------------------------------------- task "none" on every layout
@pytest.mark.parametrize(
    "name",
    [
        "msrs-segmentation",
        "fmb-segmentation",
        "m3fd-detection",
        "llvip-detection",
        "roadscene-pretrain",
    ],
)
def test_fusion_only_smoke_training_runs_on_every_dataset(name, tmp_path, capsys):
    config = write_config(
        tmp_path, name=name, task="none", loss_weights="max_intensity", meta_steps=0
    )
    out = tmp_path / "run"
    arguments = ["train", "--config", str(config), "--smoke", "--out", str(out)]
    code = main([*arguments, "--device", "cpu", "--fusion-steps", "1"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert "trained" in capsys.readouterr().out
    assert (out / "fusion_model.pt").is_file()
    log = (out / "training_log.csv").read_text().strip().splitlines()
    assert len(log) == 2  # the header and one fusion step
    assert json.loads((out / "recipe.json").read_text())["task"] == "none"


@pytest.mark.parametrize(
    "name", ["msrs-segmentation", "fmb-segmentation", "m3fd-detection", "llvip-detection"]
)
def test_a_fusion_only_recipe_reads_pairs_without_label_folders(name, tmp_path):
    recipe = RECIPES[name].replace(task="none", loss_weights="max_intensity", meta_steps=0)
    root = make_smoke_dataset(recipe, tmp_path)
    folders = {path.name for path in root.rglob("*") if path.is_dir()}
    assert not folders & {"Segmentation_labels", "Label", "Annotation", "Annotations", "labels"}
    dataset = build_dataset(recipe, root)
    assert len(dataset) > 0
    a, b, target = dataset[0]
    assert a.shape == b.shape and isinstance(target, str)


def test_a_learned_fusion_only_recipe_trains_with_meta_steps(tmp_path, capsys):
    config = write_config(tmp_path, name="msrs-segmentation", task="none")
    out = tmp_path / "run"
    arguments = ["train", "--config", str(config), "--smoke", "--out", str(out)]
    assert main([*arguments, "--device", "cpu", "--fusion-steps", "1"]) == 0
    assert (out / "loss_generator.pt").is_file()


def test_a_smoke_run_with_fixed_loss_weights_has_no_meta_step(tmp_path, capsys):
    # The config keeps the recipe's 200 meta steps; --smoke drops them for fixed weights.
    config = write_config(tmp_path, name="msrs-segmentation", task="none", loss_weights="equal")
    out = tmp_path / "run"
    arguments = ["train", "--config", str(config), "--smoke", "--out", str(out)]
    assert main([*arguments, "--device", "cpu", "--fusion-steps", "1"]) == 0
    assert json.loads((out / "recipe.json").read_text())["meta_steps"] == 0
    assert not (out / "loss_generator.pt").exists()


def test_a_task_the_dataset_has_no_labels_for_is_refused():
    with pytest.raises(DataError, match="dataset 'fmb' has no detection labels"):
        RECIPES["fmb-segmentation"].replace(task="detection")
    with pytest.raises(DataError, match="dataset 'roadscene' has no segmentation labels"):
        RECIPES["roadscene-pretrain"].replace(task="segmentation", num_classes=9)


# ------------------------------------------------------------------ one line, exit 2, from CLI
@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"epoch": 3}, "unknown recipe settings: ['epoch'] (did you mean 'epochs'?)"),
        ({"colour": "red"}, "unknown recipe settings: ['colour']; the settings are alpha,"),
        ({"preset": "reserch"}, "preset must be one of 'default', 'research', got 'reserch'"),
        ({"weighting": "quad"}, "weighting must be one of 'linear', 'squared', got 'quad'"),
        ({"label_resolution": "half"}, "label_resolution must be one of 'task', 'full'"),
        ({"task_inner_optimizer": "rmsprop"}, "task_inner_optimizer must be one of 'sgd',"),
        ({"generator_update": "adam"}, "generator_update must be one of 'normalized',"),
        ({"fusion_step_order": "later"}, "fusion_step_order must be one of 'simultaneous',"),
        ({"loss_weights": "max"}, "loss_weights must be one of 'learned', 'equal',"),
        ({"precision": "fp8"}, "precision must be one of 'fp32', 'bf16', 'fp16', got 'fp8'"),
        ({"dataset": "kaist"}, "dataset must be one of 'msrs', 'fmb',"),
        ({"task": "tracking"}, "task must be one of 'segmentation', 'detection', 'none'"),
        ({"task_size": [240]}, "task_size must be a list of 2 integers or null, got [240]"),
        ({"task_size": [240, 320, 5]}, "task_size must be a list of 2 integers or null"),
        ({"task_size": ["240", 320]}, 'task_size must be a list of 2 integers or null, got ["240"'),
        ({"task_size": 240}, "task_size must be a list of 2 integers or null, got 240"),
        ({"task_size": [0, 320]}, "task_size must be two sizes of at least 1"),
        ({"swap": "false"}, "swap must be true or false, got 'false'"),
        ({"compile": "no"}, "compile must be true or false, got 'no'"),
        ({"swap": 0}, "swap must be true or false, got 0"),
        ({"epochs": "1"}, "epochs must be an integer, got '1'"),
        ({"epochs": 1.5}, "epochs must be an integer, got 1.5"),
        ({"epochs": 0}, "epochs must be at least 1, got 0"),
        ({"batch_size": True}, "batch_size must be an integer, got True"),
        ({"stride": 0}, "stride must be at least 1, got 0"),
        ({"fusion_steps": 0}, "fusion_steps must be at least 1, got 0"),
        ({"fusion_crop": -4}, "fusion_crop must be at least 1, got -4"),
        ({"meta_steps": -1}, "meta_steps must be at least 0, got -1"),
        ({"lr": 0}, "lr must be above 0, got 0.0"),
        ({"inner_lr": "1e-4"}, "inner_lr must be a number, got '1e-4'"),
        ({"generator_lr": -1e-4}, "generator_lr must be above 0, got -0.0001"),
        ({"exposure_p": 2}, "exposure_p must be in [0, 1], got 2.0"),
        ({"init_weights": 3}, "init_weights must be a string or null"),
    ],
)
def test_bad_config_settings_get_one_line_naming_the_setting(settings, expected, tmp_path, capsys):
    config = write_config(tmp_path, **{"name": "msrs-segmentation", **settings})
    arguments = ["train", "--config", str(config), "--data-root", str(tmp_path / "none")]
    assert main([*arguments, "--out", str(tmp_path / "out")]) == 2
    assert expected in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_non_finite_learning_rate_is_refused(tmp_path, capsys):
    config = tmp_path / "recipe.json"
    config.write_text('{"name": "msrs-segmentation", "lr": NaN}')  # Python's json reads NaN
    arguments = ["train", "--config", str(config), "--data-root", str(tmp_path)]
    assert main([*arguments, "--out", str(tmp_path / "out")]) == 2
    assert "lr must be a finite number, got nan" in one_line_error(capsys)
    with pytest.raises(DataError, match="gamma must be a finite number, got inf"):
        load_recipe("msrs-segmentation", gamma=math.inf)


def test_the_unknown_config_setting_names_the_file(tmp_path, capsys):
    config = write_config(tmp_path, name="msrs-segmentation", epoch=3)
    assert main(["train", "--config", str(config), "--smoke", "--out", str(tmp_path / "o")]) == 2
    assert f"recipe config {config}: unknown recipe settings" in one_line_error(capsys)


def test_meta_steps_with_fixed_loss_weights_get_one_line(tmp_path, capsys):
    arguments = ["train", "--recipe", "roadscene-pretrain", "--meta-steps", "5"]
    code = main([*arguments, "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 2
    error = one_line_error(capsys)
    assert "fixed loss weights (loss_weights 'max_intensity') cannot be learned" in error
    assert "meta_steps must be 0, got 5" in error
    # The same through --smoke, which otherwise sets the meta steps by the loss weights.
    assert main([*arguments, "--smoke", "--out", str(tmp_path / "o")]) == 2
    assert "meta_steps must be 0, got 5" in one_line_error(capsys)


def test_a_fusion_crop_larger_than_the_images_gets_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    arguments = ["train", "--recipe", "msrs-segmentation", "--smoke", "--fusion-crop", "1000"]
    assert main([*arguments, "--out", str(out), "--device", "cpu"]) == 2
    error = one_line_error(capsys)
    assert "fusion_crop must be at most 480, the shorter side of the training images" in error
    assert "(640x480, width x height" in error and "got 1000" in error
    assert not out.exists()
    # With pairs cropped as they are read, the crop is checked against data_crop at once.
    with pytest.raises(DataError, match=r"fusion_crop must be at most data_crop \(128"):
        RECIPES["roadscene-pretrain"].replace(fusion_crop=200)


def test_the_fusion_crop_may_be_as_large_as_the_shorter_side(tmp_path):
    from tdfusion.recipes import _check_fusion_crop

    recipe = RECIPES["msrs-segmentation"].replace(task_size=(96, 128))
    dataset = build_dataset(recipe, make_smoke_dataset(recipe, tmp_path))
    _check_fusion_crop(recipe.replace(fusion_crop=480), dataset)  # 480x640 images: fits
    with pytest.raises(DataError, match="fusion_crop must be at most 480"):
        _check_fusion_crop(recipe.replace(fusion_crop=481), dataset)


# --------------------------------------------------------------------------- the Python API
def test_replace_and_load_recipe_check_the_settings(tmp_path):
    recipe = RECIPES["msrs-segmentation"]
    with pytest.raises(DataError, match="recipe msrs-segmentation: swap must be true or false"):
        recipe.replace(swap="false")
    with pytest.raises(DataError, match=r"unknown recipe settings: \['epoch'\]"):
        recipe.replace(epoch=3)
    with pytest.raises(DataError, match="preset must be one of"):
        recipe.replace(preset="paper")
    with pytest.raises(DataError, match="unknown recipe 42"):
        load_recipe(config=write_config(tmp_path, name=42))
    with pytest.raises(DataError, match="must hold a JSON object, got list"):
        config = tmp_path / "list.json"
        config.write_text("[1, 2]")
        load_recipe(config=config)
    # Values of the right kind are kept, and normalised: a list size to a tuple, an int to float.
    changed = load_recipe(config=write_config(tmp_path, name="llvip-detection", lr=1))
    assert changed.lr == 1.0 and type(changed.lr) is float
    assert recipe.replace(task_size=[96, 128], fusion_crop=None).task_size == (96, 128)
    assert recipe.replace(loss_weights="equal", meta_steps=0).meta_steps == 0
    for paper_recipe in RECIPES.values():
        paper_recipe.validate()


def test_train_checks_a_recipe_built_without_replace(tmp_path):
    bad = dataclasses.replace(RECIPES["roadscene-pretrain"], epochs="2")
    with pytest.raises(DataError, match="epochs must be an integer, got '2'"):
        train(bad, tmp_path, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_config_naming_another_recipe_than_recipe_is_refused(tmp_path, capsys):
    config = write_config(tmp_path, name="m3fd-detection", epochs=3)
    with pytest.raises(DataError) as refused:
        load_recipe("msrs-segmentation", config)
    message = str(refused.value)
    assert "'msrs-segmentation'" in message and "'m3fd-detection'" in message
    assert str(config) in message
    assert load_recipe("m3fd-detection", config).epochs == 3  # the same name is fine
    arguments = ["train", "--recipe", "llvip-detection", "--config", str(config), "--smoke"]
    assert main([*arguments, "--out", str(tmp_path / "run")]) == 2
    error = one_line_error(capsys)
    assert "'llvip-detection'" in error and "'m3fd-detection'" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["sizes", "header"])
def test_bad_training_images_are_refused_before_anything_is_written(damage, tmp_path, capsys):
    recipe = RECIPES["roadscene-pretrain"].replace(epochs=1, fusion_steps=1, data_crop=32)
    root = make_smoke_dataset(recipe, tmp_path / "data")
    bad = sorted((root / "vi").iterdir())[1]
    if damage == "sizes":
        Image.open(bad).crop((0, 0, 40, 30)).save(bad)
        expected = f"but {bad} is 40x30"
    else:
        bad.write_bytes(bad.read_bytes()[:20])
        expected = f"cannot read image {bad}"
    out = tmp_path / "run"
    out.mkdir()  # an existing folder: nothing may appear in it, not even a lock file
    arguments = ["train", "--recipe", "roadscene-pretrain", "--data-root", str(root)]
    assert main([*arguments, "--out", str(out), "--device", "cpu"]) == 2
    error = one_line_error(capsys)
    assert "1 of " in error and expected in error
    assert list(out.iterdir()) == []
    assert main([*arguments, "--out", str(tmp_path / "new"), "--device", "cpu"]) == 2
    assert not (tmp_path / "new").exists()
