"""End-to-end tests of ``tdfusion evaluate`` through :func:`tdfusion.cli.main`, in process."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tdfusion.cli import main
from tdfusion.metrics import METRIC_NAMES, evaluate, summarise
from tdfusion.metrics._io import read_luma

STEMS = ("night", "street")
# The largest Qabf can be (a perfect copy with strong edges).
QABF_CAP = 0.9994 * 0.9879 / (1 + math.exp(-22 * (1 - 0.8)))


def _smooth_image(seed: int, shape: tuple[int, int] = (48, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0 : shape[0], 0 : shape[1]]
    phase = rng.uniform(0, 2 * np.pi, 2)
    image = 128 + 90 * np.sin(columns / 7 + phase[0]) * np.cos(rows / 9 + phase[1])
    return np.clip(np.round(image + rng.normal(0, 6, shape)), 0, 255).astype(np.uint8)


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """Folders of 2 fused (grey BMP), infrared (grey PNG) and visible (RGB PNG) images."""
    paths = {name: tmp_path / name for name in ("fused", "ir", "vi")}
    for path in paths.values():
        path.mkdir()
    for index, stem in enumerate(STEMS):
        infrared = _smooth_image(10 * index)
        visible_rgb = np.dstack([_smooth_image(10 * index + k) for k in (1, 2, 3)])
        Image.fromarray(infrared).save(paths["ir"] / f"{stem}.png")
        Image.fromarray(visible_rgb).save(paths["vi"] / f"{stem}.png")
        visible_luma = read_luma(paths["vi"] / f"{stem}.png")
        fused = np.maximum(infrared, visible_luma).astype(np.uint8)
        Image.fromarray(fused).save(paths["fused"] / f"{stem}.bmp")
    return paths


def _arguments(folders: dict[str, Path], *extra: str) -> list[str]:
    return [
        "evaluate",
        "--fused",
        str(folders["fused"]),
        "--ir",
        str(folders["ir"]),
        "--vis",
        str(folders["vi"]),
        *extra,
    ]


def _expected_scores(folders: dict[str, Path]) -> dict[str, dict[str, float]]:
    return {
        stem: evaluate(
            read_luma(folders["fused"] / f"{stem}.bmp"),
            read_luma(folders["ir"] / f"{stem}.png"),
            read_luma(folders["vi"] / f"{stem}.png"),
        )
        for stem in STEMS
    }


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The last line of standard error, after checking it is the only non-progress line."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines, "nothing was written to standard error"
    assert not any("Traceback" in line for line in lines)
    return lines[-1]


def test_evaluate_prints_the_table_and_writes_the_csv(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path = tmp_path / "out" / "scores.csv"
    assert main(_arguments(folders, "--csv", str(csv_path))) == 0

    expected = _expected_scores(folders)
    summary = summarise(expected.values())
    output = capsys.readouterr().out
    for name in METRIC_NAMES:
        mean, std = summary[name]
        assert f"{name:<6} {mean:>9.4f} {std:>9.4f}" in output
    assert "2 image(s)" in output
    assert "mean over the two sources" in output
    assert "nats" in output

    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == list(STEMS)
    assert list(rows[0]) == ["name", *METRIC_NAMES]
    for row in rows:
        written = {name: float(row[name]) for name in METRIC_NAMES}
        assert written == pytest.approx(expected[row["name"]], rel=1e-12)


def test_evaluate_with_worker_processes_gives_the_same_csv(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    serial, parallel = tmp_path / "serial.csv", tmp_path / "parallel.csv"
    assert main(_arguments(folders, "--csv", str(serial))) == 0
    assert main(_arguments(folders, "--csv", str(parallel), "--jobs", "2")) == 0
    assert parallel.read_text() == serial.read_text()


def test_evaluate_on_real_msrs_pairs(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = shared_data / "MSRS" / "example"
    fused_folder = tmp_path / "fused"
    fused_folder.mkdir()
    for path in sorted((source / "ir").glob("*.png")):
        fused = np.maximum(read_luma(path), read_luma(source / "vi" / path.name))
        Image.fromarray(fused.astype(np.uint8)).save(fused_folder / path.name)
    arguments = ["evaluate", "--fused", str(fused_folder), "--ir", str(source / "ir")]
    assert main([*arguments, "--vis", str(source / "vi"), "--csv", str(tmp_path / "m.csv")]) == 0
    with (tmp_path / "m.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(list((source / "ir").glob("*.png")))
    for row in rows:
        # The per-pixel maximum keeps most of both sources: plausible fusion scores.
        assert 0.3 < float(row["VIF"]) < 1.0
        assert 0.4 < float(row["Qabf"]) < QABF_CAP
        assert 0.4 < float(row["SSIM"]) < 1.0
    assert "Qabf" in capsys.readouterr().out


def test_unpaired_names_exit_2_with_a_one_line_message(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (folders["vi"] / "street.png").rename(folders["vi"] / "avenue.png")
    assert main(_arguments(folders)) == 2
    line = _error_line(capsys)
    assert line.startswith("tdfusion evaluate: error: unpaired images:")
    assert "avenue.png" in line
    assert "street.bmp" in line


def test_size_mismatch_exits_2_naming_the_files(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    Image.fromarray(_smooth_image(5, (48, 70))).save(folders["fused"] / "night.bmp")
    assert main(_arguments(folders)) == 2
    line = _error_line(capsys)
    assert line.startswith("tdfusion evaluate: error: image sizes differ:")
    assert "night.bmp is 70x48" in line
    assert "night.png is 64x48" in line


def test_unreadable_image_exits_2_naming_the_file(
    folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (folders["ir"] / "street.png").write_bytes(b"\x89PNG truncated")
    assert main(_arguments(folders, "--jobs", "2")) == 2
    line = _error_line(capsys)
    assert line.startswith("tdfusion evaluate: error: cannot read image")
    assert "street.png" in line


def test_missing_folder_exits_2(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders["ir"] = tmp_path / "nowhere"
    assert main(_arguments(folders)) == 2
    assert "nowhere does not exist" in _error_line(capsys)


@pytest.mark.parametrize("jobs", ["0", "two"])
def test_bad_jobs_value_is_a_usage_error(folders: dict[str, Path], jobs: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(_arguments(folders, "--jobs", jobs))
    assert exit_info.value.code == 2


def test_help_lists_the_evaluate_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "evaluate" in capsys.readouterr().out


def test_unwritable_csv_exits_2(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_arguments(folders, "--csv", str(tmp_path))) == 2  # a folder, not a file
    assert "cannot write CSV file" in _error_line(capsys)
