"""Tests of tdfusion.metrics: hand-computable cases, the field's conventions, the loop baseline."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from tdfusion.errors import DataError
from tdfusion.metrics import (
    METRIC_NAMES,
    average_gradient,
    entropy,
    evaluate,
    evaluate_files,
    evaluate_folders,
    evaluate_many,
    mutual_information,
    mutual_information_pair,
    psnr,
    qabf,
    scd,
    sobel_strength_orientation,
    spatial_frequency,
    ssim,
    standard_deviation,
    summarise,
    vif,
    vif_pair,
)
from tdfusion.metrics._io import list_images, pair_by_stem, read_luma

REPO_ROOT = Path(__file__).resolve().parents[1]

# Qabf of an image against itself where every edge is strong: the strength sigmoid saturates
# at Tg (equal strengths keep gF itself) and the orientation term is Ta / (1 + exp(-22 * 0.2)).
QABF_CAP = 0.9994 * 0.9879 / (1 + math.exp(-22 * (1 - 0.8)))


def _load_reference_module():
    path = REPO_ROOT / "benchmarks" / "_reference_metrics.py"
    spec = importlib.util.spec_from_file_location("_reference_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference_evaluate():
    """The loop-style port of the reference evaluator in benchmarks/."""
    return _load_reference_module().reference_evaluate


@pytest.fixture
def textured_triple() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth random 48 x 56 pair in 0..255 (integer levels) and their mean as fused image."""
    rng = np.random.default_rng(7)
    row = np.linspace(0, 3 * np.pi, 56)
    column = np.linspace(0, 2 * np.pi, 48)[:, None]
    a = np.round(127 + 100 * np.sin(row + column) + rng.normal(0, 8, (48, 56)))
    b = np.round(127 + 90 * np.cos(2 * row - column) + rng.normal(0, 8, (48, 56)))
    a, b = np.clip(a, 0, 255), np.clip(b, 0, 255)
    return np.round((a + b) / 2), a, b


# 64 x 80 crops of real MSRS pairs where both sources have detail and each is the brighter
# somewhere (so the per-pixel maximum takes from both and every correlation is defined).
MSRS_CROPS = [("00906N", 224, 400), ("00004N", 200, 300)]


@pytest.fixture(params=MSRS_CROPS, ids=[stem for stem, _, _ in MSRS_CROPS])
def msrs_crop(request, shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 64 x 80 crop of a real MSRS pair (infrared, visible Y), integer levels."""
    stem, top, left = request.param
    infrared = read_luma(shared_data / "MSRS" / "example" / "ir" / f"{stem}.png")
    visible = read_luma(shared_data / "MSRS" / "example" / "vi" / f"{stem}.png")
    crop = (slice(top, top + 64), slice(left, left + 80))
    return infrared[crop], visible[crop]


# --- EN, SD, SF, AG -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (np.full((4, 4), 17.0), 0.0),
        (np.array([[0, 0], [255, 255]]), 1.0),
        (np.array([[0, 1], [2, 3]]), 2.0),
        (np.array([[0, 0, 0, 1]]), -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))),
        (np.array([[0.4, 0.6]]), 1.0),  # rounds to the levels 0 and 1
        (np.array([[-3.0, 0.0, 300.0, 255.0]]), 1.0),  # clipped, not wrapped: {0, 0, 255, 255}
    ],
)
def test_entropy_of_known_histograms(image: np.ndarray, expected: float) -> None:
    assert entropy(image) == pytest.approx(expected, abs=1e-12)


def test_standard_deviation_is_the_population_one() -> None:
    image = np.array([[2.0, 4.0, 4.0, 4.0], [5.0, 5.0, 7.0, 9.0]])
    assert standard_deviation(image) == pytest.approx(2.0)
    assert standard_deviation(np.full((3, 3), 9)) == 0.0


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (np.array([[0, 3], [0, 3]]), 3.0),
        (np.array([[0, 1], [2, 3]]), math.sqrt(1 + 4)),
        (np.full((5, 5), 80.0), 0.0),
        # horizontal steps 1, 2 (mean of squares 2.5); vertical steps all 10
        (np.array([[0, 1, 3], [10, 11, 13]]), math.sqrt(2.5 + 100)),
    ],
)
def test_spatial_frequency_of_known_arrays(image: np.ndarray, expected: float) -> None:
    assert spatial_frequency(image) == pytest.approx(expected)


def test_average_gradient_of_ramps_and_borders() -> None:
    ramp = np.add.outer(4.0 * np.arange(5), 3.0 * np.arange(6))  # Gy = 4, Gx = 3 everywhere
    assert average_gradient(ramp) == pytest.approx(math.sqrt((9 + 16) / 2))
    # row [0, 1, 4, 9]: one-sided 1 and 5 on the borders, central (4 - 0)/2 and (9 - 1)/2 inside
    squares = np.array([[0.0, 1.0, 4.0, 9.0]] * 3)
    expected = np.mean([1, 2, 4, 5]) / math.sqrt(2)
    assert average_gradient(squares) == pytest.approx(expected)


# --- MI ---------------------------------------------------------------------------------------


def test_mutual_information_of_identical_images_is_twice_their_entropy_in_nats() -> None:
    image = np.array([[0, 0, 50, 50], [100, 100, 200, 200]])
    assert mutual_information(image, image, image) == pytest.approx(2 * math.log(4))
    assert mutual_information_pair(image, image) == pytest.approx(entropy(image) * math.log(2))


def test_mutual_information_of_independent_or_constant_images_is_zero() -> None:
    rows = np.repeat(np.array([[0], [255]]), 4, axis=1)  # varies down the rows only
    columns = np.tile(np.array([[0, 10, 20, 30]]), (2, 1))  # varies along the rows only
    assert mutual_information_pair(rows, columns) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(rows, np.zeros((2, 4)), np.full((2, 4), 9)) == 0.0


def test_mutual_information_with_a_constant_image_of_real_size_is_exactly_zero() -> None:
    # Probabilities summed over 256 bins are not exactly 1 for a 480 x 640 image; counts are.
    varied = np.random.default_rng(0).integers(0, 256, (480, 640)).astype(np.float64)
    constant = np.full_like(varied, 7.0)
    assert mutual_information_pair(varied, constant) == 0.0
    assert mutual_information_pair(constant, varied) == 0.0
    assert mutual_information(varied, constant, np.full_like(varied, 9.0)) == 0.0
    assert evaluate(varied, constant, constant)["MI"] == 0.0


def test_mutual_information_uses_integer_levels() -> None:
    image = np.array([[0.0, 0.0, 9.0, 9.0]])
    assert mutual_information(image + 0.3, image, image) == mutual_information(image, image, image)


# --- SCD ----------------------------------------------------------------------------------------


def test_scd_is_two_when_the_fused_image_is_the_sum(textured_triple) -> None:
    _, a, b = textured_triple
    assert scd(a + b, a, b) == pytest.approx(2.0)


def test_scd_of_simple_arrays() -> None:
    a = np.array([[1.0, 2.0, 3.0, 4.0]])
    b = np.array([[4.0, 1.0, 3.0, 2.0]])
    fused = np.array([[2.0, 2.0, 3.0, 3.0]])
    expected = (
        np.corrcoef(a.ravel(), (fused - b).ravel())[0, 1]
        + np.corrcoef(b.ravel(), (fused - a).ravel())[0, 1]
    )
    assert scd(fused, a, b) == pytest.approx(expected)
    assert scd(fused, a, b) == pytest.approx(scd(fused, b, a))


def test_scd_is_nan_when_a_correlation_is_undefined() -> None:
    constant = np.full((3, 3), 5.0)
    assert math.isnan(scd(constant, constant, constant))


# --- VIF ------------------------------------------------------------------------------------------


def test_vif_of_a_perfect_copy_is_one(textured_triple) -> None:
    _, a, _ = textured_triple
    assert vif(a, a, a) == pytest.approx(1.0, abs=1e-9)
    assert vif_pair(a, a) == pytest.approx(1.0, abs=1e-9)


def test_vif_is_the_mean_of_the_two_sources_and_symmetric(textured_triple) -> None:
    fused, a, b = textured_triple
    assert vif(fused, a, b) == pytest.approx((vif_pair(a, fused) + vif_pair(b, fused)) / 2)
    assert vif(fused, a, b) == pytest.approx(vif(fused, b, a))
    assert 0 < vif(fused, a, b) < 1


def test_vif_exceeds_one_for_a_contrast_enhanced_copy(textured_triple) -> None:
    _, a, _ = textured_triple
    assert vif_pair(a, 2 * a) > 1.0


def test_vif_of_a_constant_reference_is_one(textured_triple) -> None:
    _, a, _ = textured_triple
    assert vif_pair(np.full_like(a, 90.0), a) == 1.0


def test_vif_rejects_images_too_small_for_four_scales() -> None:
    small = np.zeros((40, 60))
    with pytest.raises(ValueError, match=r"41 x 41.*\(40, 60\)"):
        vif(small, small, small)


# --- Qabf ---------------------------------------------------------------------------------------


def test_sobel_strength_and_orientation_with_zero_padding() -> None:
    step = np.zeros((5, 5))
    step[:, 3:] = 10.0
    strength, orientation = sobel_strength_orientation(step)
    # Interior pixel left of the step: the left-minus-right Sobel column difference is -40.
    assert strength[2, 2] == pytest.approx(40.0)
    assert orientation[2, 2] == pytest.approx(0.0)
    # Flat interior: Sx = 0 gives orientation pi / 2.
    assert strength[2, 0] == 0.0
    assert orientation[2, 0] == pytest.approx(math.pi / 2)
    # Zero padding makes the image border an edge: at the top-right corner Sx = Sy = 3 * 10.
    assert strength[0, 4] == pytest.approx(math.hypot(30.0, 30.0))
    assert orientation[0, 4] == pytest.approx(math.pi / 4)


def test_qabf_of_a_perfect_copy_is_the_sigmoid_cap() -> None:
    step = np.zeros((8, 8))
    step[:, 4:] = 100.0
    assert qabf(step, step, step) == pytest.approx(QABF_CAP, rel=1e-12)


def test_qabf_is_near_zero_when_every_edge_is_lost(textured_triple) -> None:
    _, a, b = textured_triple
    assert qabf(np.zeros_like(a), a, b) < 1e-3


def test_qabf_is_symmetric_in_the_sources_and_nan_without_edges(textured_triple) -> None:
    fused, a, b = textured_triple
    assert qabf(fused, a, b) == pytest.approx(qabf(fused, b, a))
    zeros = np.zeros((9, 9))
    assert math.isnan(qabf(zeros, zeros, zeros))


# --- SSIM and PSNR ----------------------------------------------------------------------------


def test_ssim_is_the_mean_of_scikit_image_on_rounded_uint8(textured_triple) -> None:
    fused, a, b = textured_triple
    shifted = fused + 0.6  # rounds up by one level; a bare uint8 cast would truncate it away
    expected = np.mean(
        [
            structural_similarity(
                (fused + 1).astype(np.uint8), source.astype(np.uint8), data_range=255
            )
            for source in (a, b)
        ]
    )
    assert ssim(shifted, a, b) == pytest.approx(expected, rel=1e-12)
    assert ssim(a, a, a) == 1.0


def test_ssim_rejects_images_smaller_than_its_window() -> None:
    with pytest.raises(ValueError, match="7 x 7"):
        ssim(np.zeros((6, 9)), np.zeros((6, 9)), np.zeros((6, 9)))


@pytest.mark.parametrize(
    ("offset_a", "offset_b", "expected"),
    [
        (255.0, 255.0, 0.0),
        (1.0, 1.0, 10 * math.log10(255**2)),
        (1.0, 3.0, 10 * math.log10(255**2 / 5)),  # MSEs 1 and 9: their mean is 5
    ],
)
def test_psnr_of_known_mean_squared_errors(offset_a: float, offset_b: float, expected: float):
    fused = np.zeros((4, 6))
    assert psnr(fused, fused + offset_a, fused - offset_b) == pytest.approx(expected)


def test_psnr_is_infinite_for_a_perfect_copy() -> None:
    image = np.arange(12.0).reshape(3, 4)
    assert psnr(image, image, image) == math.inf


# --- evaluate --------------------------------------------------------------------------------


def test_evaluate_returns_every_metric_in_order(textured_triple) -> None:
    fused, a, b = textured_triple
    scores = evaluate(fused, a, b)
    assert tuple(scores) == METRIC_NAMES
    assert all(isinstance(value, float) for value in scores.values())
    individual = {
        "EN": entropy(fused),
        "SD": standard_deviation(fused),
        "SF": spatial_frequency(fused),
        "AG": average_gradient(fused),
        "MI": mutual_information(fused, a, b),
        "SCD": scd(fused, a, b),
        "VIF": vif(fused, a, b),
        "Qabf": qabf(fused, a, b),
        "SSIM": ssim(fused, a, b),
        "PSNR": psnr(fused, a, b),
    }
    assert scores == pytest.approx(individual, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int64, np.float32])
def test_evaluate_does_not_depend_on_the_input_dtype(textured_triple, dtype) -> None:
    fused, a, b = textured_triple
    as_float = evaluate(fused, a, b)
    as_dtype = evaluate(fused.astype(dtype), a.astype(dtype), b.astype(dtype))
    assert as_dtype == pytest.approx(as_float, rel=1e-12)


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((48, 56), (48, 56), (48, 55)), r"\(48, 56\).*\(48, 55\)"),
        (((48, 56), (56, 48), (48, 56)), r"\(56, 48\)"),
        (((48, 56, 3), (48, 56), (48, 56)), r"2-D.*\(48, 56, 3\)"),
    ],
)
def test_evaluate_rejects_mismatched_or_non_2d_shapes(shapes, match) -> None:
    arrays = [np.zeros(shape) for shape in shapes]
    with pytest.raises(ValueError, match=match):
        evaluate(*arrays)


def test_evaluate_rejects_non_finite_values(textured_triple) -> None:
    fused, a, b = textured_triple
    fused = fused.copy()
    fused[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(fused, a, b)


def test_evaluate_agrees_with_the_loop_baseline_on_synthetic_images(
    textured_triple, reference_evaluate
) -> None:
    fused, a, b = textured_triple
    noisy = fused + np.random.default_rng(3).normal(0, 4, fused.shape)  # not integer-valued
    for candidate in (fused, noisy):
        assert evaluate(candidate, a, b) == pytest.approx(
            reference_evaluate(candidate, a, b), rel=1e-6
        )


@pytest.mark.parametrize("fusion", ["max", "mean", "noisy"])
def test_evaluate_agrees_with_the_loop_baseline_on_a_real_crop(
    msrs_crop, reference_evaluate, fusion
) -> None:
    infrared, visible = msrs_crop
    if fusion == "max":
        fused = np.maximum(infrared, visible)
    elif fusion == "mean":
        fused = np.round((infrared + visible) / 2)
    else:
        noise = np.random.default_rng(0).normal(0, 6, infrared.shape)
        fused = np.clip(0.6 * infrared + 0.4 * visible + noise, 0, 255)
    ours = evaluate(fused, infrared, visible)
    baseline = reference_evaluate(fused, infrared, visible)
    assert ours == pytest.approx(baseline, rel=1e-6)


# --- reading, pairing, folders ---------------------------------------------------------------


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path)
    return path


def test_read_luma_of_grey_colour_alpha_and_16_bit_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
    expected_luma = np.round(rgb @ np.array([0.299, 0.587, 0.114]))
    grey = rng.integers(0, 256, (6, 7), dtype=np.uint8)

    assert np.array_equal(read_luma(_write(tmp_path / "rgb.png", rgb)), expected_luma)
    rgba = np.dstack([rgb, np.full((6, 7), 30, np.uint8)])
    assert np.array_equal(read_luma(_write(tmp_path / "rgba.png", rgba)), expected_luma)
    assert np.array_equal(read_luma(_write(tmp_path / "grey.png", grey)), grey)
    grey_as_rgb = np.dstack([grey] * 3)
    assert np.array_equal(read_luma(_write(tmp_path / "grey3.bmp", grey_as_rgb)), grey)
    sixteen = (grey.astype(np.uint16) * 257).astype(np.uint16)
    assert np.array_equal(read_luma(_write(tmp_path / "grey16.png", sixteen)), grey)
    assert read_luma(tmp_path / "rgb.png").dtype == np.float64


def test_read_luma_names_an_unreadable_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"broken\.png"):
        read_luma(broken)


def test_pairing_by_stem_across_suffixes(tmp_path: Path) -> None:
    image = np.zeros((4, 4), np.uint8)
    for folder, suffix in (("fused", ".png"), ("ir", ".jpg"), ("vi", ".TIFF")):
        (tmp_path / folder).mkdir()
        for stem in ("b", "a"):
            _write(tmp_path / folder / f"{stem}{suffix}", image)
    (tmp_path / "fused" / "notes.txt").write_text("ignored")
    triples = pair_by_stem(tmp_path / "fused", tmp_path / "ir", tmp_path / "vi")
    assert [[path.name for path in triple] for triple in triples] == [
        ["a.png", "a.jpg", "a.TIFF"],
        ["b.png", "b.jpg", "b.TIFF"],
    ]


def test_pairing_names_unpaired_and_duplicate_files(tmp_path: Path) -> None:
    image = np.zeros((4, 4), np.uint8)
    for folder in ("fused", "ir", "vi"):
        (tmp_path / folder).mkdir()
        _write(tmp_path / folder / "a.png", image)
    _write(tmp_path / "fused" / "extra.png", image)
    with pytest.raises(DataError, match=r"extra\.png has no infrared or visible counterpart"):
        pair_by_stem(tmp_path / "fused", tmp_path / "ir", tmp_path / "vi")
    _write(tmp_path / "ir" / "a.bmp", image)
    with pytest.raises(DataError, match=r"two images named 'a'"):
        list_images(tmp_path / "ir", "infrared")
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_evaluate_files_reports_size_mismatch_with_file_names(tmp_path: Path) -> None:
    fused = _write(tmp_path / "f.png", np.zeros((50, 60), np.uint8))
    infrared = _write(tmp_path / "i.png", np.zeros((50, 60), np.uint8))
    visible = _write(tmp_path / "v.png", np.zeros((50, 61), np.uint8))
    with pytest.raises(DataError, match=r"v\.png is 61x50"):
        evaluate_files(fused, infrared, visible)


def test_evaluate_folders_in_worker_processes_matches_in_process(
    shared_data: Path, tmp_path: Path
) -> None:
    source = shared_data / "MSRS" / "example"
    stems = ["00004N", "00036N"]
    for folder in ("fused", "ir", "vi"):
        (tmp_path / folder).mkdir()
    for stem in stems:
        infrared = read_luma(source / "ir" / f"{stem}.png")
        visible = read_luma(source / "vi" / f"{stem}.png")
        crop = (slice(0, 96), slice(0, 128))
        _write(tmp_path / "ir" / f"{stem}.png", infrared[crop].astype(np.uint8))
        _write(tmp_path / "vi" / f"{stem}.png", visible[crop].astype(np.uint8))
        fused = np.maximum(infrared, visible)[crop].astype(np.uint8)
        _write(tmp_path / "fused" / f"{stem}.png", fused)
    folders = (tmp_path / "fused", tmp_path / "ir", tmp_path / "vi")
    serial = evaluate_folders(*folders)
    parallel = evaluate_folders(*folders, jobs=2)
    assert list(serial) == stems
    assert parallel == serial
    triples = pair_by_stem(*folders)
    assert evaluate_many(triples) == list(serial.values())


def test_evaluate_many_rejects_zero_jobs() -> None:
    with pytest.raises(ValueError, match="jobs"):
        evaluate_many([], jobs=0)


def test_summarise_gives_mean_and_population_std() -> None:
    rows = [{"EN": 6.0, "SD": 30.0}, {"EN": 7.0, "SD": 40.0}, {"EN": 8.0, "SD": 50.0}]
    summary = summarise(rows)
    assert list(summary) == ["EN", "SD"]
    assert summary["EN"] == pytest.approx((7.0, math.sqrt(2 / 3)))
    assert summary["SD"] == pytest.approx((40.0, math.sqrt(200 / 3)))
