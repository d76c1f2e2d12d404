"""Float images in ``tdfusion evaluate``: taken on the 0..255 scale, a [0, 1] image refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tdfusion.cli import main
from tdfusion.errors import DataError
from tdfusion.metrics._io import read_luma


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(20, 236, size=(48, 64)).astype(np.uint8)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """Infrared and visible PNGs and a fused image as an 8-bit PNG (``png``), a float TIFF on
    the 0..255 scale (``tiff255``) and a float TIFF in [0, 1] (``tiff1``), for two stems."""
    paths = {name: tmp_path / name for name in ("ir", "vi", "png", "tiff255", "tiff1")}
    for path in paths.values():
        path.mkdir()
    for index, stem in enumerate(("a", "b")):
        fused = _image(3 * index)
        Image.fromarray(_image(3 * index + 1)).save(paths["ir"] / f"{stem}.png")
        Image.fromarray(_image(3 * index + 2)).save(paths["vi"] / f"{stem}.png")
        Image.fromarray(fused).save(paths["png"] / f"{stem}.png")
        Image.fromarray(fused.astype(np.float32)).save(paths["tiff255"] / f"{stem}.tif")
        Image.fromarray(fused.astype(np.float32) / 255).save(paths["tiff1"] / f"{stem}.tif")
    return paths


def test_a_float_tiff_on_the_0_255_scale_reads_like_the_8_bit_image(folders):
    assert Image.open(folders["tiff255"] / "a.tif").mode == "F"
    assert np.array_equal(
        read_luma(folders["tiff255"] / "a.tif"), read_luma(folders["png"] / "a.png")
    )


def test_a_float_tiff_in_0_1_is_refused_naming_the_file(folders):
    path = folders["tiff1"] / "a.tif"
    with pytest.raises(DataError, match=r"a\.tif is a floating-point image with values in \[0\.0"):
        read_luma(path)
    with pytest.raises(DataError, match="multiply it by 255"):
        read_luma(path)


def test_an_8_bit_image_with_no_level_above_1_is_still_read(tmp_path):
    path = tmp_path / "dark.png"
    Image.fromarray(np.ones((4, 4), dtype=np.uint8)).save(path)
    assert read_luma(path).max() == 1.0


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_evaluate_refuses_a_float_image_in_0_1_with_one_line(folders, capsys, jobs):
    arguments = ["evaluate", "--fused", str(folders["tiff1"]), "--ir", str(folders["ir"])]
    assert main([*arguments, "--vis", str(folders["vi"]), "--jobs", jobs]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("tdfusion evaluate: error: image ")
    assert "is a floating-point image with values in [" in error and "multiply it by 255" in error


def test_evaluate_scores_a_float_tiff_on_the_0_255_scale_as_the_png(folders, capsys):
    tables = []
    for fused in ("png", "tiff255"):
        arguments = ["evaluate", "--fused", str(folders[fused]), "--ir", str(folders["ir"])]
        assert main([*arguments, "--vis", str(folders["vi"])]) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1]


def test_the_evaluate_help_says_how_float_images_are_read(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "a float image with no value above 1 (a [0, 1] image) is refused" in help_text
