"""Inference: tiling, colour, folder fusion and the fuse/weights command lines."""

from __future__ import annotations

import itertools
import os
import re
import stat
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from tdfusion.cli import main
from tdfusion.errors import DataError
from tdfusion.inference import (
    AcceleratedFusion,
    accelerate,
    blend_chroma,
    blend_window,
    colorize,
    fuse_files,
    fuse_folders,
    fuse_in_tiles,
    fuse_tensors,
    merge_chroma,
    min_max_stretch,
    tile_starts,
)
from tdfusion.inference.tiling import balanced_tile
from tdfusion.nets import LossGenerator, ReFusionNet


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize(("length", "tile", "overlap"), [(100, 40, 8), (64, 64, 8), (97, 32, 16)])
def test_tiles_cover_the_image_with_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = np.zeros(length, dtype=bool)
    for start in starts:
        assert 0 <= start <= length - min(tile, length)
        covered[start : start + tile] = True
    assert covered.all()
    for first, second in itertools.pairwise(starts):
        assert first + tile - second >= overlap


def test_blend_window_is_positive_and_flat_inside():
    window = blend_window(16, 20, 4, dtype=torch.float64, device="cpu")[0, 0]
    assert (window > 0).all() and window.max() == 1.0
    assert torch.all(window[4:-4, 4:-4] == 1.0)
    assert window[0, 0] < window[1, 1] < window[3, 3]


def test_tiling_a_pointwise_function_is_exact():
    a, b = torch.rand(2, 1, 50, 70), torch.rand(2, 1, 50, 70)
    fused = fuse_in_tiles(lambda x, y: 0.3 * x + 0.7 * y, a, b, tile=24, overlap=6)
    torch.testing.assert_close(fused, 0.3 * a + 0.7 * b)


def seam_step(difference: torch.Tensor) -> float:
    """Largest jump between neighbouring pixels of a difference image (a seam shows as one)."""
    rows = (difference[..., 1:, :] - difference[..., :-1, :]).abs().max()
    cols = (difference[..., :, 1:] - difference[..., :, :-1]).abs().max()
    return float(max(rows, cols))


def smooth_pair(height: int = 96, width: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    a = (0.5 + 0.4 * torch.sin(6 * x) * torch.cos(4 * y))[None, None]
    b = (0.5 + 0.4 * torch.cos(5 * x + 3 * y))[None, None]
    return a, b


def test_blended_tiles_have_no_seams_where_hard_tiles_do():
    torch.manual_seed(0)
    net = ReFusionNet().eval()
    a, b = smooth_pair()
    whole = fuse_tensors(net, a, b)
    blended = fuse_tensors(net, a, b, tile=64, overlap=24)
    hard = fuse_tensors(net, a, b, tile=64, overlap=0)
    assert blended.shape == whole.shape
    # The network's attention is global, so a tile differs slightly from the whole image; the
    # blend turns those differences into smooth ramps instead of steps at the tile borders.
    assert seam_step(blended - whole) < 0.3 * seam_step(hard - whole)
    assert (blended - whole).abs().mean() < (hard - whole).abs().mean()


def test_tiled_and_whole_outputs_agree_closely_with_trained_weights(shared_data):
    net = ReFusionNet.from_pretrained(shared_data / "weights" / "ReFusion" / "ReFusion_IVIF.pth")
    from tdfusion.data.io import read_luma

    source = shared_data / "MSRS" / "example"
    luma_a, _ = read_luma(source / "ir" / "00004N.png")
    luma_b, _ = read_luma(source / "vi" / "00004N.png")
    a = torch.from_numpy(luma_a[:160, :224].copy())[None, None]
    b = torch.from_numpy(luma_b[:160, :224].copy())[None, None]
    whole = fuse_tensors(net, a, b)
    tiled = fuse_tensors(net, a, b, tile=96, overlap=32)
    difference = tiled - whole
    assert difference.abs().mean() < 0.02  # on the [0, 1] scale: about 5 grey levels at most
    assert seam_step(difference) < 0.05


@pytest.mark.filterwarnings("ignore:fusing a .* in tiles of:UserWarning")
def test_large_images_are_tiled_automatically():
    calls = []

    def record(x, y):
        calls.append(tuple(x.shape))
        return x

    a = torch.rand(1, 1, 140, 150)
    fuse_tensors(record, a, a, max_pixels=100 * 100)
    assert len(calls) > 1 and all(shape[-2] * shape[-1] <= 100 * 100 for shape in calls)


@pytest.mark.filterwarnings("ignore:fusing a .* in tiles of:UserWarning")
@pytest.mark.parametrize(
    ("height", "width", "max_side", "overlap"),
    [(257, 257, 256, 32), (300, 130, 128, 16), (129, 1000, 128, 32), (65, 65, 64, 63)],
)
def test_automatic_tiles_compute_little_more_than_the_image(height, width, max_side, overlap):
    computed = []

    def record(x, y):
        computed.append(x.shape[-2] * x.shape[-1])
        return 0.25 * x + 0.75 * y

    a, b = torch.rand(1, 1, height, width), torch.rand(1, 1, height, width)
    fused = fuse_tensors(record, a, b, overlap=overlap, max_pixels=max_side * max_side)
    torch.testing.assert_close(fused, 0.25 * a + 0.75 * b)
    assert len(computed) > 1 and max(computed) <= max_side * max_side
    # only the overlaps are computed twice: no longer up to 4x the image (two 256-tiles for 257)
    rows = -(-(height - overlap) // (max_side - overlap))
    cols = -(-(width - overlap) // (max_side - overlap))
    needed = (height + (rows - 1) * overlap + rows) * (width + (cols - 1) * overlap + cols)
    assert sum(computed) <= needed


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(2049, 2048, 32), (5000, 512, 32), (100, 40, 8), (41, 40, 39), (7, 40, 8)],
)
def test_balanced_tiles_cover_with_as_few_tiles_and_the_overlap(length, tile, overlap):
    size = balanced_tile(length, tile, overlap)
    assert size <= tile
    starts = tile_starts(length, size, overlap)
    assert len(starts) == len(tile_starts(length, tile, overlap))  # no more tiles than before
    assert starts[-1] + size == length and starts[0] == 0
    for first, second in itertools.pairwise(starts):
        assert first + size - second >= overlap
    if len(starts) > 1 and size - 1 > overlap:  # the smallest: one less needs another tile
        assert len(tile_starts(length, size - 1, overlap)) > len(starts)
    assert balanced_tile(2049, 2048, 32) == 1041


def test_an_image_in_one_automatic_tile_fuses_as_the_whole_image():
    torch.manual_seed(0)
    net = ReFusionNet(dim=8, num_heads=4, num_blocks=1).eval()
    a, b = torch.rand(1, 1, 60, 44), torch.rand(1, 1, 60, 44)
    with torch.inference_mode():
        whole = net(a, b)
    # over the budget of 10 pixels, but within the smallest tile (64): one tile, the image
    torch.testing.assert_close(fuse_tensors(net, a, b, max_pixels=10), whole)


def test_blend_chroma_prefers_the_saturated_source():
    grey = np.full((2, 2, 2), 128.0)
    red = np.full((2, 2, 2), 200.0)
    assert np.allclose(blend_chroma(grey, red), 200.0)
    assert np.allclose(blend_chroma(grey, grey), 128.0)
    mixed = blend_chroma(np.full((1, 1, 2), 138.0), np.full((1, 1, 2), 98.0))
    assert mixed[0, 0, 0] == pytest.approx((138 * 10 + 98 * 30) / 40)


def test_merge_chroma_gray_and_colour():
    luma = np.full((3, 4), 100.4)
    assert merge_chroma(luma, None, None).dtype == np.uint8
    assert merge_chroma(luma, None, None).shape == (3, 4)
    rgb = merge_chroma(luma, None, np.full((3, 4, 2), 128.0))
    assert rgb.shape == (3, 4, 3) and np.all(rgb == 100)


def test_min_max_stretch():
    image = np.array([[0.2, 0.4], [0.6, 0.3]])
    stretched = min_max_stretch(image)
    assert stretched.min() == 0.0 and stretched.max() == 1.0
    assert np.array_equal(min_max_stretch(np.full((2, 2), 0.5)), np.full((2, 2), 0.5))


def test_colorize_is_ordered():
    heat = colorize(np.array([[0.0, 0.5, 1.0]]))
    assert heat.shape == (1, 3, 3) and heat.dtype == np.uint8
    brightness = heat.astype(int).sum(axis=-1)[0]
    assert brightness[0] < brightness[1] < brightness[2]


def write_pair(folder, name, size=(40, 52), colour=True, seed=0):
    rng = np.random.default_rng(seed)
    (folder / "ir").mkdir(parents=True, exist_ok=True)
    (folder / "vi").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / "ir" / f"{name}.png")
    visible = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    image = Image.fromarray(visible) if colour else Image.fromarray(visible[..., 0])
    image.save(folder / "vi" / f"{name}.png")


@pytest.fixture
def weights_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "weights" / "refusion.pt"
    ReFusionNet(dim=8, num_heads=4, num_blocks=1).save_pretrained(path)
    return path


def test_fuse_folders_writes_colour_at_input_size_and_batches(tmp_path, weights_file):
    write_pair(tmp_path, "one", size=(33, 47))
    write_pair(tmp_path, "two", size=(33, 47), seed=1)
    write_pair(tmp_path, "grey", size=(20, 21), colour=False, seed=2)
    model = ReFusionNet.from_pretrained(weights_file)
    report = fuse_folders(
        model, tmp_path / "ir", tmp_path / "vi", tmp_path / "out", batch=2, progress=False
    )
    assert sorted(p.name for p in report.written) == ["grey.png", "one.png", "two.png"]
    one = np.asarray(Image.open(tmp_path / "out" / "one.png"))
    assert one.shape == (33, 47, 3)
    assert np.asarray(Image.open(tmp_path / "out" / "grey.png")).shape == (20, 21)
    single = fuse_files(model, tmp_path / "ir" / "one.png", tmp_path / "vi" / "one.png")
    assert np.abs(single.astype(int) - one.astype(int)).max() <= 1  # batched == single


def test_fuse_cli_end_to_end_and_bad_pairs(tmp_path, weights_file, capsys):
    write_pair(tmp_path, "good")
    write_pair(tmp_path, "small", size=(30, 30))
    Image.fromarray(np.zeros((31, 30), dtype=np.uint8)).save(tmp_path / "vi" / "small.png")
    (tmp_path / "ir" / "lonely.png").write_bytes((tmp_path / "ir" / "good.png").read_bytes())
    arguments = [
        "fuse",
        "--ir",
        str(tmp_path / "ir"),
        "--vis",
        str(tmp_path / "vi"),
        "--out",
        str(tmp_path / "out"),
        "--weights",
        str(weights_file),
        "--device",
        "cpu",
    ]
    assert main(arguments) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("tdfusion fuse: error: unpaired images:") and "lonely.png" in error
    assert len(error.splitlines()) == 1

    assert main([*arguments, "--skip-bad"]) == 1
    captured = capsys.readouterr()
    assert "fused 1 pair(s)" in captured.out
    assert "small" in captured.err and "size mismatch" in captured.err
    assert (tmp_path / "out" / "good.png").is_file()


def test_fuse_cli_refuses_to_write_into_an_input_folder(tmp_path, weights_file, capsys):
    write_pair(tmp_path, "good")
    code = main(
        [
            "fuse",
            "--ir",
            str(tmp_path / "ir"),
            "--vis",
            str(tmp_path / "vi"),
            "--out",
            str(tmp_path / "vi"),
            "--weights",
            str(weights_file),
        ]
    )
    assert code == 2 and "is an input folder" in capsys.readouterr().err


def test_fuse_cli_names_a_missing_weights_file(tmp_path, capsys):
    write_pair(tmp_path, "good")
    code = main(
        [
            "fuse",
            "--ir",
            str(tmp_path / "ir"),
            "--vis",
            str(tmp_path / "vi"),
            "--out",
            str(tmp_path / "out"),
            "--weights",
            str(tmp_path / "nope.pth"),
        ]
    )
    assert code == 2 and "nope.pth" in capsys.readouterr().err


def test_fuse_cli_with_the_authors_weights_on_real_pairs(shared_data, tmp_path):
    weights = shared_data / "weights" / "ReFusion" / "ReFusion_IVIF.pth"
    ir, vis = tmp_path / "ir", tmp_path / "vi"
    ir.mkdir()
    vis.mkdir()
    source = shared_data / "MSRS" / "example"
    for name in ("00004N.png",):  # crop to keep the test fast; the network is size-agnostic
        Image.open(source / "ir" / name).crop((0, 0, 160, 120)).save(ir / name)
        Image.open(source / "vi" / name).crop((0, 0, 160, 120)).save(vis / name)
    assert (
        main(
            [
                "fuse",
                "--ir",
                str(ir),
                "--vis",
                str(vis),
                "--out",
                str(tmp_path / "out"),
                "--weights",
                str(weights),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    fused = np.asarray(Image.open(tmp_path / "out" / "00004N.png"))
    assert fused.shape == (120, 160, 3) and fused.std() > 5


def test_weights_cli_writes_heat_maps(tmp_path):
    write_pair(tmp_path, "one")
    torch.manual_seed(0)
    LossGenerator(dim=8, num_heads=4, num_blocks=1).save_pretrained(tmp_path / "g.pt")
    assert (
        main(
            [
                "weights",
                "--ir",
                str(tmp_path / "ir"),
                "--vis",
                str(tmp_path / "vi"),
                "--checkpoint",
                str(tmp_path / "g.pt"),
                "--out",
                str(tmp_path / "maps"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    heat = np.asarray(Image.open(tmp_path / "maps" / "one_wa.png"))
    assert heat.shape == (40, 52, 3)
    assert (tmp_path / "maps" / "one_wa_overlay.png").is_file()


def test_fuse_cli_on_a_full_size_llvip_pair_in_tiles(shared_data, tmp_path):
    """LLVIP is 1280x1024 with an infrared image stored as three equal planes."""
    weights = shared_data / "weights" / "ReFusion" / "ReFusion_IVIF.pth"
    ir, vis = tmp_path / "ir", tmp_path / "vi"
    ir.mkdir()
    vis.mkdir()
    source = shared_data / "LLVIP" / "example"
    (ir / "190001.jpg").write_bytes((source / "ir" / "190001.jpg").read_bytes())
    (vis / "190001.jpg").write_bytes((source / "vi" / "190001.jpg").read_bytes())
    arguments = [
        "fuse",
        "--ir",
        str(ir),
        "--vis",
        str(vis),
        "--out",
        str(tmp_path / "out"),
        "--weights",
        str(weights),
        "--device",
        "cpu",
        "--tile",
        "512",
        "--overlap",
        "64",
    ]
    assert main(arguments) == 0
    fused = np.asarray(Image.open(tmp_path / "out" / "190001.png"))
    assert fused.shape == (1024, 1280, 3)
    assert fused.std() > 10 and fused.min() < fused.max()


def fuse_arguments(tmp_path, weights, *extra):
    return ["fuse", "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
            "--out", str(tmp_path / "out"), "--weights", str(weights), "--device", "cpu",
            *extra]  # fmt: skip


def written_images(folder):
    return sorted(p.name for p in folder.glob("*.png")) if folder.exists() else []


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_fuse_cli_writes_nothing_for_an_input_with_non_finite_pixels(
    tmp_path, weights_file, capsys, bad
):
    write_pair(tmp_path, "a_good")
    write_pair(tmp_path, "b_poisoned", colour=False, seed=1)
    values = np.random.default_rng(0).random((40, 52)).astype(np.float32) * 255
    values[3, 4] = bad
    (tmp_path / "ir" / "b_poisoned.png").unlink()
    Image.fromarray(values).save(tmp_path / "ir" / "b_poisoned.tif")
    assert main(fuse_arguments(tmp_path, weights_file)) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "b_poisoned.tif has 1 NaN or infinite pixel" in error
    assert "nothing written" in error and "--skip-bad" in error
    assert written_images(tmp_path / "out") == []
    assert main(fuse_arguments(tmp_path, weights_file, "--skip-bad")) == 1
    assert written_images(tmp_path / "out") == ["a_good.png"]


def test_fuse_cli_refuses_weights_holding_nan(tmp_path, capsys):
    write_pair(tmp_path, "one")
    model = ReFusionNet(dim=8, num_heads=4, num_blocks=1)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    weights = model.save_pretrained(tmp_path / "nan.pt")
    assert main(fuse_arguments(tmp_path, weights)) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "nan.pt holds NaN or infinite values" in error
    assert written_images(tmp_path / "out") == []


class NaNForSome(torch.nn.Module):
    """A fusion network whose output is NaN for images whose first pixel is dark."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, a, b):
        fused = (a + b) / 2 * self.scale
        dark = a[:, :, :1, :1] < 0.5
        return torch.where(dark, torch.full_like(fused, float("nan")), fused)


def test_fuse_folders_never_writes_a_non_finite_output(tmp_path):
    for index, name in enumerate(["a", "b", "c"]):
        write_pair(tmp_path, name, colour=False, seed=index)
        first = 255 if name != "b" else 0
        for role in ("ir", "vi"):
            image = np.asarray(Image.open(tmp_path / role / f"{name}.png")).copy()
            image[0, 0] = first
            Image.fromarray(image).save(tmp_path / role / f"{name}.png")
    folders = (tmp_path / "ir", tmp_path / "vi", tmp_path / "out")
    with pytest.raises(DataError) as caught:
        fuse_folders(NaNForSome(), *folders, progress=False)
    message = str(caught.value)
    assert "b.png and" in message and "gave NaN or infinite values" in message
    assert "stopped after writing 1 of 3 pair(s)" in message and "--skip-bad" in message
    assert written_images(tmp_path / "out") == ["a.png"]
    report = fuse_folders(NaNForSome(), *folders, skip_bad=True, progress=False)
    assert [name for name, _ in report.skipped] == ["b"]
    assert written_images(tmp_path / "out") == ["a.png", "c.png"]


def test_fuse_checks_every_pair_before_writing_anything(tmp_path, weights_file, capsys):
    for index, name in enumerate(["a", "b", "z"]):
        write_pair(tmp_path, name, seed=index)
    damaged = tmp_path / "vi" / "z.png"
    damaged.write_bytes(damaged.read_bytes()[:60])
    assert main(fuse_arguments(tmp_path, weights_file)) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "1 of 3 pair(s) cannot be fused, nothing written" in error and "z.png" in error
    assert "--skip-bad" in error
    assert written_images(tmp_path / "out") == []


def test_fuse_and_weights_handle_names_of_240_characters(tmp_path, weights_file):
    stem = "n" * 240
    write_pair(tmp_path, stem)
    assert main(fuse_arguments(tmp_path, weights_file)) == 0
    assert written_images(tmp_path / "out") == [f"{stem}.png"]
    LossGenerator(dim=8, num_heads=4, num_blocks=1).save_pretrained(tmp_path / "g.pt")
    arguments = ["weights", "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
                 "--checkpoint", str(tmp_path / "g.pt"), "--out", str(tmp_path / "maps"),
                 "--device", "cpu"]  # fmt: skip
    assert main(arguments) == 0
    assert written_images(tmp_path / "maps") == [f"{stem}_wa.png", f"{stem}_wa_overlay.png"]
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]


def test_a_second_fuse_into_the_same_folder_fails_with_one_line(tmp_path, weights_file, capsys):
    from tdfusion.files import output_lock

    write_pair(tmp_path, "one")
    LossGenerator(dim=8, num_heads=4, num_blocks=1).save_pretrained(tmp_path / "g.pt")
    with output_lock(tmp_path / "out", purpose="tdfusion fuse"):
        assert main(fuse_arguments(tmp_path, weights_file)) == 2
        error = capsys.readouterr().err
        assert len(error.strip().splitlines()) == 1
        assert "is in use by another tdfusion process" in error
        assert written_images(tmp_path / "out") == []
        arguments = ["weights", "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
                     "--checkpoint", str(tmp_path / "g.pt"), "--out", str(tmp_path / "out"),
                     "--device", "cpu"]  # fmt: skip
        assert main(arguments) == 2
        assert "is in use" in capsys.readouterr().err
    assert main(fuse_arguments(tmp_path, weights_file)) == 0


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_fused_images_and_weight_maps_follow_the_umask(tmp_path, weights_file):
    write_pair(tmp_path, "one")
    LossGenerator(dim=8, num_heads=4, num_blocks=1).save_pretrained(tmp_path / "g.pt")
    previous = os.umask(0o022)
    try:
        assert main(fuse_arguments(tmp_path, weights_file)) == 0
        assert main(["weights", "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
                     "--checkpoint", str(tmp_path / "g.pt"), "--out", str(tmp_path / "maps"),
                     "--device", "cpu"]) == 0  # fmt: skip
    finally:
        os.umask(previous)
    for path in [tmp_path / "out" / "one.png", *(tmp_path / "maps").glob("*.png")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


# --- inference options ---------------------------------------------------------------------

SMALL = {"dim": 8, "num_blocks": 1, "num_heads": 2}


def small_pair(height=16, width=20):
    generator = torch.Generator().manual_seed(5)
    return tuple(torch.rand(1, 1, height, width, generator=generator) for _ in range(2))


def test_fp32_options_fuse_exactly_like_the_network():
    torch.manual_seed(0)
    net = ReFusionNet(**SMALL).eval()
    a, b = small_pair()
    fast = accelerate(net)
    assert isinstance(fast, AcceleratedFusion) and fast.compiled is False
    torch.testing.assert_close(fuse_tensors(fast, a, b), fuse_tensors(net, a, b), rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_stay_close_and_return_the_input_dtype(precision):
    torch.manual_seed(0)
    net = ReFusionNet(**SMALL).eval()
    a, b = small_pair()
    reference = fuse_tensors(net, a, b)
    fused = fuse_tensors(accelerate(net, precision=precision), a, b)
    assert fused.dtype == torch.float32
    assert 0 < (fused - reference).abs().max() < 3e-2


def test_unknown_precision_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16', 'fp16'"):
        accelerate(ReFusionNet(**SMALL), precision="int8")


def test_channels_last_keeps_the_state_dict():
    net = ReFusionNet(**SMALL).eval()
    shapes = {name: value.shape for name, value in net.state_dict().items()}
    a, b = small_pair()
    reference = fuse_tensors(net, a, b)
    fast = accelerate(net, channels_last=True)
    assert net.head_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert {name: value.shape for name, value in net.state_dict().items()} == shapes
    torch.testing.assert_close(fuse_tensors(fast, a, b), reference)


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def failing_compile(model, **options):
        def compiled(*args):
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    net = ReFusionNet(**SMALL).eval()
    a, b = small_pair()
    fast = accelerate(net, compile=True)
    assert fast.compiled is None
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*no compiler here"):
        fused = fuse_tensors(fast, a, b)
    assert fast.compiled is False
    torch.testing.assert_close(fused, fuse_tensors(net, a, b))
    fuse_tensors(fast, a, b)  # no second attempt, no second warning


def test_compiled_model_is_used_once_compiling_works(monkeypatch):
    calls = []

    def recording_compile(model, **options):
        calls.append(options)
        return lambda a, b: model(a, b) * 0 + 0.5

    monkeypatch.setattr(torch, "compile", recording_compile)
    fast = accelerate(ReFusionNet(**SMALL).eval(), compile=True, compile_options={"mode": "x"})
    a, b = small_pair()
    assert torch.all(fuse_tensors(fast, a, b) == 0.5)
    assert torch.all(fuse_tensors(fast, a, b) == 0.5)
    assert fast.compiled is True and calls == [{"mode": "x"}]


def never_called(a, b):
    raise AssertionError("the network ran")


@pytest.mark.parametrize(
    ("tile", "overlap", "message"),
    [
        (32, 32, "tile 32 must be at least twice overlap 32 (tiles would advance by 0 pixel(s))"),
        (40, 32, "tile 40 must be at least twice overlap 32"),
        (0, 32, "tile must be a positive integer, got 0"),
        (-8, 0, "tile must be a positive integer, got -8"),
        (64, -1, "overlap must be at least 0, got -1"),
        (None, -1, "overlap must be at least 0, got -1"),
    ],
)
def test_fuse_tensors_refuses_the_tiles_the_cli_refuses(tile, overlap, message):
    a = torch.rand(1, 1, 40, 48)
    with pytest.raises(ValueError, match=re.escape(message)):
        fuse_tensors(never_called, a, a, tile=tile, overlap=overlap)


def test_the_cli_and_the_api_refuse_a_tile_in_the_same_words(tmp_path, capsys):
    write_pair(tmp_path, "one")
    with pytest.raises(SystemExit):
        main(fuse_arguments(tmp_path, tmp_path / "w.pt", "--tile", "40"))
    advance = "(tiles would advance by 8 pixel(s)); use a larger"
    cli_message = capsys.readouterr().err
    assert f"--tile 40 must be at least twice --overlap 32 {advance} --tile or a" in cli_message
    with pytest.raises(ValueError) as caught:
        fuse_tensors(never_called, torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), tile=40)
    assert str(caught.value) == (
        f"tile 40 must be at least twice overlap 32 {advance} tile or a smaller overlap"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tile": 32}, "tile 32 must be at least twice overlap 32"),
        ({"tile": 0}, "tile must be a positive integer, got 0"),
        ({"overlap": -1}, "overlap must be at least 0, got -1"),
        ({"batch": 0}, "batch must be at least 1; got 0"),
        ({"batch": -2}, "batch must be at least 1; got -2"),
    ],
)
def test_fuse_folders_refuses_bad_options_before_anything_is_written(tmp_path, options, message):
    write_pair(tmp_path, "one")
    with pytest.raises(ValueError, match=re.escape(message)):
        fuse_folders(never_called, tmp_path / "ir", tmp_path / "vi", tmp_path / "out",
                     progress=False, **options)  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_sources_on_the_0_255_scale_are_refused_naming_the_maximum():
    a, b = torch.rand(1, 1, 16, 20), torch.rand(1, 1, 16, 20)
    b[0, 0, 3, 4] = 1.0
    with pytest.raises(
        ValueError, match=r"second source has values up to 255; .*must be in \[0, 1\]"
    ):
        fuse_tensors(never_called, a, b * 255)
    with pytest.raises(ValueError, match=r"first source has values up to 1\.01;"):
        fuse_tensors(never_called, a.clamp(max=0.5) + 0.51, b)
    fused = fuse_tensors(lambda x, y: (x + y) / 2, a, b.clamp(max=1.0) + 5e-4)  # rounding is fine
    assert fused.shape == a.shape


def test_reading_images_never_gives_sources_above_1(tmp_path):
    from tdfusion.data.io import read_luma

    white = np.full((4, 5, 3), 255, dtype=np.uint8)
    Image.fromarray(white).save(tmp_path / "white.png")
    Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)).save(tmp_path / "white16.png")
    for name in ("white.png", "white16.png"):
        assert read_luma(tmp_path / name)[0].max() <= 1.0


def test_load_fusion_model_refuses_an_unknown_device_in_one_line():
    from tdfusion.inference import load_fusion_model

    with pytest.raises(
        ValueError, match=r"^unknown device 'gpu'; expected cpu, cuda, cuda:N or mps$"
    ):
        load_fusion_model(device="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_fusion_model_refuses_cuda_without_a_gpu_in_one_line():
    from tdfusion.inference import load_fusion_model

    with pytest.raises(ValueError, match=r"device 'cuda': CUDA is not available on this machine"):
        load_fusion_model(device="cuda")


def test_automatic_tiling_warns_once_naming_the_size_and_the_tile():
    a = torch.rand(1, 1, 140, 150)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            fuse_tensors(lambda x, y: x, a, a, max_pixels=100 * 100)
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1, messages
    assert messages[0].startswith("fusing a 150x140 image (more than 10000 pixels) in tiles of ")
    assert "differs from the whole image's" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fuse_tensors(lambda x, y: x, a, a, tile=64, max_pixels=100 * 100)  # asked: no warning
        fuse_tensors(lambda x, y: x, a, a)  # under the budget: no warning


def test_the_tile_help_says_that_tiling_changes_the_output(capsys):
    with pytest.raises(SystemExit):
        main(["fuse", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Tiling changes the output" in text and "up to 16 grey levels" in text
    assert "more than 2048x2048 pixels are tiled automatically" in text
