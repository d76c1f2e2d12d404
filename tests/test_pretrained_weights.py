"""The bundled ``tdfusion-ivif`` weights: loading by name, quality, and the recipe behind them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tdfusion.cli import main
from tdfusion.data import sample_folders
from tdfusion.data.io import read_luma_pair
from tdfusion.metrics import evaluate
from tdfusion.nets import DEFAULT_FUSION_WEIGHTS, ReFusionNet, list_pretrained
from tdfusion.nets.bundled import WEIGHTS_FOLDER, bundled_path, bundled_weights
from tdfusion.recipes import RECIPES


def test_list_pretrained_names_each_bundled_file_with_one_line():
    listing = list_pretrained()
    assert DEFAULT_FUSION_WEIGHTS in listing
    for name, summary in listing.items():
        assert summary and "\n" not in summary
        entry = bundled_weights(name)
        assert entry is not None and entry.path.is_file()
        assert (WEIGHTS_FOLDER / entry.card).is_file(), f"{name} has no model card"


def test_bundled_weights_are_small_and_finite():
    path = bundled_path("tdfusion-ivif")
    assert path.stat().st_size < 1_000_000
    model = ReFusionNet.from_pretrained("tdfusion-ivif")
    assert not model.training
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())


def test_a_path_is_still_a_path(tmp_path):
    saved = ReFusionNet(dim=8).save_pretrained(tmp_path / "mine.pt")
    assert ReFusionNet.from_pretrained(saved).config["dim"] == 8
    with pytest.raises(FileNotFoundError, match="tdfusion-nope"):
        ReFusionNet.from_pretrained("tdfusion-nope")


def test_model_card_states_the_recipe_seed_and_measured_metrics():
    card = (WEIGHTS_FOLDER / bundled_weights("tdfusion-ivif").card).read_text()
    assert "tdfusion train --recipe roadscene-pretrain" in card
    assert "seed" in card.lower()
    for metric in ("EN", "SF", "SCD", "VIF", "Qabf", "SSIM"):
        assert metric in card
    assert "RoadScene" in card


@pytest.fixture(scope="module")
def fused_sample_pairs():
    """The four bundled sample pairs fused with the bundled weights: (fused, ir, vis) in 0..255."""
    ir, vis = sample_folders()
    model = ReFusionNet.from_pretrained("tdfusion-ivif")
    triples = []
    for path in sorted(ir.glob("*.png")):
        luma_ir, luma_vis, _, _ = read_luma_pair(path, vis / path.name)
        with torch.inference_mode():
            fused = model(
                torch.from_numpy(luma_ir)[None, None], torch.from_numpy(luma_vis)[None, None]
            )[0, 0].numpy()
        triples.append((fused * 255.0, luma_ir * 255.0, luma_vis * 255.0))
    return triples


def test_bundled_weights_fuse_real_pairs_well(fused_sample_pairs):
    # Floors a little under the measured means (VIF 0.468, Qabf 0.653, SSIM 0.695): a
    # regression guard for the weights that ship.
    scores = [evaluate(*triple) for triple in fused_sample_pairs]
    mean = {key: float(np.mean([s[key] for s in scores])) for key in ("VIF", "Qabf", "SSIM")}
    assert mean["VIF"] >= 0.45 and mean["Qabf"] >= 0.64 and mean["SSIM"] >= 0.67, mean
    for fused, ir, vis in fused_sample_pairs:
        # Natural brightness: not darker than the darker source by more than a few levels.
        assert fused.mean() >= min(ir.mean(), vis.mean()) - 3.0


@pytest.mark.parametrize("index", range(4))
def test_bundled_weights_have_no_bright_or_dark_border(fused_sample_pairs, index):
    fused, ir, vis = fused_sample_pairs[index]
    target = np.maximum(ir, vis)
    # The outermost 2-pixel ring follows the sources as closely as the inside does.
    ring = np.ones_like(fused, dtype=bool)
    ring[2:-2, 2:-2] = False
    inside = ~ring
    inside[:8] = inside[-8:] = False
    inside[:, :8] = inside[:, -8:] = False
    border_error = np.abs(fused - target)[ring].mean()
    inside_error = np.abs(fused - target)[inside].mean()
    assert border_error <= 2.0 * inside_error + 2.0, (border_error, inside_error)


def test_pretrain_recipe_is_a_fixed_loss_without_task():
    recipe = RECIPES["roadscene-pretrain"]
    assert (recipe.dataset, recipe.task, recipe.meta_steps) == ("roadscene", "none", 0)
    assert recipe.loss_weights == "max_intensity"


def test_pretrain_recipe_smoke_run_writes_fusion_weights(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", "roadscene-pretrain", "--smoke", "--out", str(out)]) == 0
    assert (out / "fusion_model.pt").is_file()
    assert not (out / "loss_generator.pt").exists()  # a fixed loss has no generator to save
    model = ReFusionNet.from_pretrained(out / "fusion_model.pt")
    assert isinstance(model, ReFusionNet)


def test_last_stage_smoke_run_from_the_bundled_weights(tmp_path):
    # The bundled weights' last stage darkens every source, blurs the infrared and adds noise
    # to the visible crops.
    recipe = RECIPES["roadscene-dark-settle"]
    assert recipe.blur_augment > 0 and recipe.noise_augment > 0 and recipe.exposure_augment
    assert (recipe.exposure_p, recipe.exposure_low) == (1.0, 0.1)
    assert recipe.init_weights == "runs/roadscene-dark-boost/fusion_model.pt"
    out = tmp_path / "dark-settle"
    arguments = ["train", "--recipe", "roadscene-dark-settle", "--smoke", "--out", str(out)]
    assert main([*arguments, "--init-weights", "tdfusion-ivif"]) == 0
    trained = ReFusionNet.from_pretrained(out / "fusion_model.pt")
    bundled = ReFusionNet.from_pretrained("tdfusion-ivif")
    # Two Adam steps at 3e-5 from the bundled weights: every value moved by at most ~6e-5.
    change = max(
        float((p - q).abs().max())
        for p, q in zip(trained.state_dict().values(), bundled.state_dict().values())
    )
    assert 0.0 < change < 1e-3


def test_fuse_without_weights_uses_the_bundled_weights(tmp_path, capsys):
    ir, vis = sample_folders()
    name = sorted(p.name for p in ir.iterdir())[0]
    out = tmp_path / "fused"
    assert main(["fuse", "--ir", str(ir / name), "--vis", str(vis / name), "--out", str(out)]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert "tdfusion-ivif" in first_line
    assert (out / name).is_file()


def test_fuse_help_names_the_default_weights(capsys):
    with pytest.raises(SystemExit):
        main(["fuse", "--help"])
    assert "tdfusion-ivif" in capsys.readouterr().out


def test_the_inference_api_defaults_to_the_bundled_weights():
    from tdfusion.inference import load_fusion_model

    model = load_fusion_model(device="cpu")
    reference = ReFusionNet.from_pretrained("tdfusion-ivif")
    for (key, value), (_, expected) in zip(
        model.state_dict().items(), reference.state_dict().items()
    ):
        assert torch.equal(value, expected), key


def test_a_folder_named_like_bundled_weights_does_not_hide_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tdfusion-ivif").mkdir()  # only a file of that name would take precedence
    assert ReFusionNet.from_pretrained("tdfusion-ivif").config == (
        ReFusionNet.from_pretrained(bundled_path("tdfusion-ivif")).config
    )
    ir, vis = sample_folders()
    name = sorted(p.name for p in ir.iterdir())[0]
    for weights in ([], ["--weights", "tdfusion-ivif"]):
        out = tmp_path / f"fused{len(weights)}"
        arguments = ["fuse", "--ir", str(ir / name), "--vis", str(vis / name), "--out", str(out)]
        assert main([*arguments, "--device", "cpu", *weights]) == 0, capsys.readouterr().err
        assert (out / name).is_file()


def test_a_folder_is_named_as_a_folder_not_as_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        ReFusionNet.from_pretrained(tmp_path)
    message = str(caught.value)
    assert f"checkpoint {str(tmp_path)!r} is a folder, not a checkpoint file" in message
    assert "not found" not in message
