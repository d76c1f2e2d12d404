"""Fusing: which inputs and outputs are accepted, inputs never overwritten, what ``--skip-bad``
skips (single files too)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tdfusion.cli import main
from tdfusion.errors import DataError
from tdfusion.files import pair_folders, pair_folders_reporting
from tdfusion.inference import fuse_folders
from tdfusion.nets import ReFusionNet


@pytest.fixture
def model() -> ReFusionNet:
    torch.manual_seed(0)
    return ReFusionNet(dim=8, num_heads=4, num_blocks=1).eval()


@pytest.fixture
def weights_file(tmp_path, model):
    path = tmp_path / "weights" / "refusion.pt"
    model.save_pretrained(path)
    return path


def save_pair(ir_path, vis_path, size=(24, 32), seed=0) -> None:
    rng = np.random.default_rng(seed)
    for path in (ir_path, vis_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(ir_path)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(vis_path)


def snapshot(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.mark.parametrize("role", ["ir", "vis"])
def test_fuse_cli_refuses_the_folder_of_an_input_file_as_output(
    tmp_path, weights_file, capsys, role
):
    save_pair(tmp_path / "t1" / "a.png", tmp_path / "t1" / "b.png")
    save_pair(tmp_path / "other" / "c.png", tmp_path / "other" / "d.png", seed=1)
    before = snapshot(tmp_path / "t1")
    ir = tmp_path / ("t1/a.png" if role == "ir" else "other/c.png")
    vis = tmp_path / ("t1/b.png" if role == "vis" else "other/d.png")
    arguments = ["fuse", "--ir", str(ir), "--vis", str(vis), "--out", str(tmp_path / "t1"),
                 "--weights", str(weights_file), "--device", "cpu"]  # fmt: skip
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert "holds the input file" in error and "t1" in error
    assert snapshot(tmp_path / "t1") == before  # nothing overwritten, nothing added


def test_fuse_folders_refuses_the_folder_of_an_input_file(tmp_path, model):
    save_pair(tmp_path / "t1" / "a.png", tmp_path / "t1" / "b.png")
    before = snapshot(tmp_path / "t1")
    with pytest.raises(DataError, match=r"holds the input file .*a\.png"):
        fuse_folders(model, tmp_path / "t1" / "a.png", tmp_path / "t1" / "b.png", tmp_path / "t1",
                     progress=False)  # fmt: skip
    assert snapshot(tmp_path / "t1") == before


@pytest.mark.skipif(os.name != "posix", reason="symbolic links")
def test_fuse_folders_refuses_an_output_that_would_replace_an_input(tmp_path, model):
    save_pair(tmp_path / "ir" / "x.png", tmp_path / "vi" / "x.png")
    save_pair(tmp_path / "ir" / "y.png", tmp_path / "vi" / "y.png", seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "y.png").symlink_to(tmp_path / "vi" / "y.png")  # writing y.png would replace it
    before = snapshot(tmp_path / "vi")
    for skip_bad in (False, True):
        with pytest.raises(DataError, match=r"'y' .*would overwrite the visible input .*y\.png"):
            fuse_folders(model, tmp_path / "ir", tmp_path / "vi", out, progress=False,
                         skip_bad=skip_bad)  # fmt: skip
    assert snapshot(tmp_path / "vi") == before
    assert sorted(path.name for path in out.iterdir()) == ["y.png"]  # nothing written


def test_fuse_folders_accepts_two_single_files_with_skip_bad(tmp_path, model):
    save_pair(tmp_path / "in" / "a.png", tmp_path / "in" / "b.png")
    for skip_bad in (False, True):
        ir, vis, out = tmp_path / "in" / "a.png", tmp_path / "in" / "b.png", tmp_path / "out"
        report = fuse_folders(
            model, ir, vis, out / str(skip_bad), skip_bad=skip_bad, progress=False
        )
        assert [path.name for path in report.written] == ["a.png"] and report.skipped == []


def test_fuse_cli_skip_bad_with_two_single_files(tmp_path, weights_file, capsys):
    save_pair(tmp_path / "in" / "a.png", tmp_path / "in" / "b.png")
    arguments = ["fuse", "--ir", str(tmp_path / "in" / "a.png"), "--vis",
                 str(tmp_path / "in" / "b.png"), "--out", str(tmp_path / "out"),
                 "--weights", str(weights_file), "--device", "cpu", "--skip-bad"]  # fmt: skip
    assert main(arguments) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "a.png").is_file()


def test_skip_bad_skips_an_ambiguous_stem_naming_both_files(tmp_path, model, capsys):
    save_pair(tmp_path / "ir" / "good.png", tmp_path / "vi" / "good.png")
    save_pair(tmp_path / "ir" / "x.png", tmp_path / "vi" / "x.png", seed=1)
    Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(tmp_path / "vi" / "x.JPG")
    with pytest.raises(DataError, match=r"two images named 'x': x\.JPG and x\.png"):
        fuse_folders(model, tmp_path / "ir", tmp_path / "vi", tmp_path / "out", progress=False)
    report = fuse_folders(model, tmp_path / "ir", tmp_path / "vi", tmp_path / "out",
                          skip_bad=True, progress=False)  # fmt: skip
    assert [path.name for path in report.written] == ["good.png"]
    assert len(report.skipped) == 1
    name, reason = report.skipped[0]
    assert name == "x" and "x.JPG" in reason and "x.png" in reason and "visible" in reason


def test_pair_folders_drops_ambiguous_stems_only_when_skipping(tmp_path):
    for folder, names in {
        "ir": ["a.png", "b.png", "c.png"],
        "vi": ["a.png", "b.JPG", "b.png"],
    }.items():
        (tmp_path / folder).mkdir()
        for name in names:
            Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / folder / name)
    folders = {"infrared": tmp_path / "ir", "visible": tmp_path / "vi"}
    with pytest.raises(DataError, match=r"visible folder .* two images named 'b': b\.JPG and"):
        pair_folders(folders)
    assert [stem for stem, _ in pair_folders(folders, skip_unpaired=True)] == ["a"]
    pairs, skipped = pair_folders_reporting(folders, skip_unpaired=True)
    assert [stem for stem, _ in pairs] == ["a"]
    assert skipped[0][0] == "b" and "b.JPG and b.png" in skipped[0][1]
    assert skipped[1][0] == "unpaired" and "c.png has no visible counterpart" in skipped[1][1]
    assert len(skipped) == 2  # the infrared b.png is not reported as unpaired too


def cli_arguments(ir, vis, out, weights, *extra) -> list[str]:
    return ["fuse", "--ir", str(ir), "--vis", str(vis), "--out", str(out),
            "--weights", str(weights), "--device", "cpu", *extra]  # fmt: skip


def test_an_output_below_a_file_gets_one_line_naming_the_file(tmp_path, weights_file, capsys):
    save_pair(tmp_path / "ir" / "a.png", tmp_path / "vi" / "a.png")
    (tmp_path / "afile").write_text("a file, not a folder\n")
    out = tmp_path / "afile" / "sub"
    assert main(cli_arguments(tmp_path / "ir", tmp_path / "vi", out, weights_file)) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert error.startswith(f"tdfusion fuse: error: cannot create the output folder {out}: ")
    assert f"{tmp_path / 'afile'} is a file, not a folder" in error
    assert (tmp_path / "afile").read_text() == "a file, not a folder\n"


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_that_cannot_be_created_gets_one_line(tmp_path, weights_file, capsys):
    save_pair(tmp_path / "ir" / "a.png", tmp_path / "vi" / "a.png")
    out = "/proc/tdfusion-cannot-be-created"
    assert main(cli_arguments(tmp_path / "ir", tmp_path / "vi", out, weights_file)) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert f"cannot create the output folder {out}: " in error


def test_fuse_folders_raises_a_data_error_for_an_output_below_a_file(tmp_path, model):
    save_pair(tmp_path / "ir" / "a.png", tmp_path / "vi" / "a.png")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match=r"afile is a file, not a folder"):
        fuse_folders(model, tmp_path / "ir", tmp_path / "vi", tmp_path / "afile" / "a" / "b",
                     progress=False)  # fmt: skip


@pytest.mark.parametrize("role", ["ir", "vis"])
def test_fuse_refuses_a_float_image_in_0_1_as_evaluate_does(tmp_path, weights_file, capsys, role):
    save_pair(tmp_path / "ir" / "a.png", tmp_path / "vi" / "a.png")
    float_path = tmp_path / ("ir" if role == "ir" else "vi") / "a.png"
    luma = np.asarray(Image.open(float_path).convert("L"), dtype=np.float32) / 255
    float_path.unlink()
    Image.fromarray(luma).save(float_path.with_suffix(".tif"))
    out = tmp_path / "out"
    assert main(cli_arguments(tmp_path / "ir", tmp_path / "vi", out, weights_file)) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert "a.tif is a floating-point image with values in [" in error
    assert "multiply it by 255" in error
    assert not out.exists()


def test_a_float_image_on_the_0_255_scale_is_still_fused(tmp_path, model):
    save_pair(tmp_path / "ir" / "a.png", tmp_path / "vi" / "a.png")
    luma = np.asarray(Image.open(tmp_path / "ir" / "a.png"), dtype=np.float32)
    Image.fromarray(luma).save(tmp_path / "a.tif")
    from tdfusion.inference import fuse_files

    as_float = fuse_files(model, tmp_path / "a.tif", tmp_path / "vi" / "a.png")
    as_png = fuse_files(model, tmp_path / "ir" / "a.png", tmp_path / "vi" / "a.png")
    assert np.array_equal(as_float, as_png)


@pytest.mark.parametrize("file_role", ["infrared", "visible"])
def test_a_file_and_a_folder_are_refused_as_a_mix(tmp_path, file_role):
    save_pair(tmp_path / "dir" / "a.png", tmp_path / "dir2" / "a.png")
    file, folder = tmp_path / "dir" / "a.png", tmp_path / "dir2"
    sources = {"infrared": folder, "visible": folder, file_role: file}
    with pytest.raises(DataError) as caught:
        pair_folders(sources)
    message = str(caught.value)
    folder_role = "visible" if file_role == "infrared" else "infrared"
    assert f"{file_role} {file} is a file" in message
    assert f"{folder_role} {folder} is a folder" in message
    assert "give both as image files (one pair) or both as folders" in message
    assert "does not exist or is not a folder" not in message


def test_the_fuse_cli_names_a_file_and_folder_mix(tmp_path, weights_file, capsys):
    save_pair(tmp_path / "dir" / "a.png", tmp_path / "dir2" / "a.png")
    arguments = cli_arguments(tmp_path / "dir" / "a.png", tmp_path / "dir2", tmp_path / "out",
                              weights_file)  # fmt: skip
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert "is a file" in error and "is a folder" in error and "both as folders" in error


@pytest.mark.parametrize("disabled", [True, False])
def test_tqdm_disable_hides_the_fuse_progress_bar(tmp_path, weights_file, disabled):
    save_pair(tmp_path / "ir" / "a.png", tmp_path / "vi" / "a.png")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TQDM")}
    if disabled:
        environment["TQDM_DISABLE"] = "1"
    arguments = cli_arguments(tmp_path / "ir", tmp_path / "vi", tmp_path / "out", weights_file)
    done = subprocess.run(
        [sys.executable, "-m", "tdfusion", *arguments],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert ("fusing:" in done.stderr) is not disabled, done.stderr
