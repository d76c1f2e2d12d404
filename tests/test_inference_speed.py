"""Speed options of folder fusion: the overlapped pipeline, precision, channels-last, compile."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from tdfusion.cli import main
from tdfusion.errors import DataError
from tdfusion.inference import (
    AcceleratedFusion,
    accelerate,
    fuse_files,
    fuse_folders,
    fuse_tensors,
    load_fusion_model,
)
from tdfusion.inference.pipeline import run_overlapped
from tdfusion.nets import ReFusionNet

SMALL = {"dim": 8, "num_blocks": 1, "num_heads": 2}


def write_pair(folder, name, size=(40, 52), colour=True, seed=0):
    rng = np.random.default_rng(seed)
    for role in ("ir", "vi"):
        (folder / role).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / "ir" / f"{name}.png")
    visible = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    image = Image.fromarray(visible) if colour else Image.fromarray(visible[..., 0])
    image.save(folder / "vi" / f"{name}.png")


def write_folder(folder, names, **sizes):
    for index, name in enumerate(names):
        write_pair(folder, name, size=sizes.get(name, (40, 52)), colour=index % 3 != 2, seed=index)


def png_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


@pytest.fixture
def weights_file(tmp_path):
    torch.manual_seed(0)
    return ReFusionNet(**SMALL).save_pretrained(tmp_path / "weights" / "refusion.pt")


def fuse_arguments(tmp_path, weights, out="out", *extra):
    return ["fuse", "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
            "--out", str(tmp_path / out), "--weights", str(weights), "--device", "cpu",
            *extra]  # fmt: skip


# --- the overlapped pipeline ---------------------------------------------------------------


def test_run_overlapped_keeps_the_order_and_uses_three_threads():
    seen = {"read": set(), "compute": set(), "write": set()}

    def source():
        for number in range(7):
            seen["read"].add(threading.current_thread().name)
            yield number

    def compute(number):
        seen["compute"].add(threading.current_thread().name)
        return number * 10

    written = []

    def write(value):
        seen["write"].add(threading.current_thread().name)
        written.append(value)

    run_overlapped(source(), compute, write, prefetch=2)
    assert written == [0, 10, 20, 30, 40, 50, 60]
    assert seen == {
        "read": {"tdfusion-read"},
        "compute": {threading.current_thread().name},
        "write": {"tdfusion-write"},
    }


def no_pipeline_threads_left():
    return not [t for t in threading.enumerate() if t.name.startswith("tdfusion-") and t.is_alive()]


@pytest.mark.parametrize("failing", ["source", "compute"])
def test_run_overlapped_writes_what_came_before_an_error_then_raises_it(failing):
    def source():
        for number in range(6):
            if failing == "source" and number == 3:
                raise DataError("bad input 3")
            yield number

    def compute(number):
        if failing == "compute" and number == 3:
            raise DataError("bad input 3")
        return number

    written = []
    with pytest.raises(DataError, match="bad input 3"):
        run_overlapped(source(), compute, written.append, prefetch=1)
    assert written == [0, 1, 2]
    assert no_pipeline_threads_left()


def test_run_overlapped_stops_writing_at_a_write_error():
    written = []

    def write(number):
        if number == 2:
            raise OSError("disk full")
        written.append(number)

    with pytest.raises(OSError, match="disk full"):
        run_overlapped(range(100), lambda n: n, write, prefetch=2)
    assert written == [0, 1]
    assert no_pipeline_threads_left()


def test_run_overlapped_writes_nothing_before_the_source_allows_it():
    allowed = threading.Event()

    def source():
        yield 0
        yield 1  # the first items are computed while the source still checks the rest
        raise DataError("the check failed")

    written = []
    with pytest.raises(DataError, match="the check failed"):
        run_overlapped(source(), lambda n: n, written.append, prefetch=2, writes_allowed=allowed)
    assert written == []
    assert no_pipeline_threads_left()


def test_run_overlapped_stops_at_once_on_keyboard_interrupt():
    def compute(number):
        if number == 2:
            raise KeyboardInterrupt
        return number

    with pytest.raises(KeyboardInterrupt):
        run_overlapped(range(1000), compute, lambda n: None, prefetch=2)
    assert no_pipeline_threads_left()
    with pytest.raises(ValueError, match="prefetch must be at least 1"):
        run_overlapped([], lambda n: n, print, prefetch=0)


@pytest.mark.parametrize("batch", [1, 2])
def test_overlapped_folder_fusion_writes_the_same_bytes_as_the_serial_one(tmp_path, batch):
    names = ["a", "b", "c", "d", "e"]
    write_folder(tmp_path, names, c=(33, 47), e=(20, 21))
    torch.manual_seed(0)
    model = ReFusionNet(**SMALL).eval()
    folders = (tmp_path / "ir", tmp_path / "vi")
    reports = {}
    for prefetch in (0, 1, 2, 8):
        out = tmp_path / f"out{prefetch}"
        reports[prefetch] = fuse_folders(
            model, *folders, out, batch=batch, prefetch=prefetch, progress=False
        )
    serial = png_bytes(tmp_path / "out0")
    assert sorted(serial) == [f"{name}.png" for name in names]
    for prefetch, report in reports.items():
        assert png_bytes(tmp_path / f"out{prefetch}") == serial, prefetch
        assert [path.name for path in report.written] == [path.name for path in reports[0].written]
        assert report.pixels == 3 * 40 * 52 + 33 * 47 + 20 * 21
        assert report.wall_seconds >= report.seconds > 0
        assert report.pairs_per_second == pytest.approx(5 / report.wall_seconds)
        assert report.pixels_per_second == pytest.approx(report.pixels / report.wall_seconds)


class NaNForSome(torch.nn.Module):
    """A fusion network whose output is NaN for images whose first pixel is dark."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, a, b):
        fused = (a + b) / 2 * self.scale
        return torch.where(a[:, :, :1, :1] < 0.5, torch.full_like(fused, float("nan")), fused)


def folder_with_a_nan_output(tmp_path, names, nan_for):
    for index, name in enumerate(names):
        write_pair(tmp_path, name, colour=False, seed=index)
        for role in ("ir", "vi"):
            image = np.asarray(Image.open(tmp_path / role / f"{name}.png")).copy()
            image[0, 0] = 0 if name == nan_for else 255
            Image.fromarray(image).save(tmp_path / role / f"{name}.png")


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("batch", [1, 2])
def test_a_nan_output_stops_the_run_after_the_pairs_before_it_either_way(tmp_path, prefetch, batch):
    names = ["a", "b", "c", "d", "e"]
    folder_with_a_nan_output(tmp_path, names, nan_for="d")
    folders = (tmp_path / "ir", tmp_path / "vi", tmp_path / "out")
    with pytest.raises(DataError) as caught:
        fuse_folders(NaNForSome(), *folders, batch=batch, prefetch=prefetch, progress=False)
    assert "d.png and" in str(caught.value) and "gave NaN or infinite values" in str(caught.value)
    assert "stopped after writing 3 of 5 pair(s)" in str(caught.value)
    assert sorted(png_bytes(tmp_path / "out")) == ["a.png", "b.png", "c.png"]
    report = fuse_folders(
        NaNForSome(), *folders, batch=batch, prefetch=prefetch, skip_bad=True, progress=False
    )
    assert [name for name, _ in report.skipped] == ["d"]
    assert [path.name for path in report.written] == ["a.png", "b.png", "c.png", "e.png"]


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("damaged", ["a", "c", "f"])
def test_a_damaged_pair_anywhere_means_nothing_written_either_way(tmp_path, prefetch, damaged):
    names = ["a", "b", "c", "d", "e", "f"]
    write_folder(tmp_path, names)
    path = tmp_path / "vi" / f"{damaged}.png"
    path.write_bytes(path.read_bytes()[:60])
    torch.manual_seed(0)
    folders = (tmp_path / "ir", tmp_path / "vi", tmp_path / "out")
    model = ReFusionNet(**SMALL).eval()
    with pytest.raises(DataError) as caught:
        fuse_folders(model, *folders, prefetch=prefetch, progress=False)
    message = str(caught.value)
    assert message.startswith("1 of 6 pair(s) cannot be fused, nothing written")
    assert f"{damaged}.png" in message and "stopped after" not in message
    assert not (tmp_path / "out").exists()  # nor its lock file
    report = fuse_folders(model, *folders, prefetch=prefetch, skip_bad=True, progress=False)
    assert [name for name, _ in report.skipped] == [damaged]
    assert len(report.written) == 5


def test_fuse_folders_refuses_a_negative_prefetch(tmp_path):
    write_pair(tmp_path, "a")
    with pytest.raises(ValueError, match="prefetch must be at least 0"):
        fuse_folders(NaNForSome(), tmp_path / "ir", tmp_path / "vi", tmp_path / "o", prefetch=-1)


# --- the command line -----------------------------------------------------------------------


def test_fuse_prints_its_throughput(tmp_path, weights_file, capsys):
    write_folder(tmp_path, ["a", "b"])
    assert main(fuse_arguments(tmp_path, weights_file)) == 0
    out = capsys.readouterr().out
    pattern = (
        r"fused 2 pair\(s\) into \S+ in \d+\.\d s: \d+\.\d\d pairs/s, \d+\.\d\d megapixels/s "
        r"\(network \d+\.\d\d s per pair\)"
    )
    assert re.search(pattern, out), out


def test_fuse_options_bf16_and_channels_last_stay_close_to_fp32(tmp_path, weights_file):
    write_folder(tmp_path, ["a", "b", "c"])
    assert main(fuse_arguments(tmp_path, weights_file, "fp32")) == 0
    assert main(fuse_arguments(tmp_path, weights_file, "bf16", "--precision", "bf16")) == 0
    assert main(fuse_arguments(tmp_path, weights_file, "cl", "--channels-last")) == 0
    for name in ("a.png", "b.png", "c.png"):
        reference = pixels(tmp_path / "fp32" / name)
        assert np.abs(pixels(tmp_path / "bf16" / name) - reference).max() <= 3  # grey levels
        assert np.abs(pixels(tmp_path / "cl" / name) - reference).max() <= 1


def test_compile_failure_in_fuse_warns_in_one_line_and_fuses_eagerly(
    tmp_path, weights_file, capsys, monkeypatch
):
    write_folder(tmp_path, ["a", "b"])
    assert main(fuse_arguments(tmp_path, weights_file, "eager")) == 0
    capsys.readouterr()

    def failing_compile(model, **options):
        raise RuntimeError("no C++ compiler found\nsecond line of the compiler's message")

    monkeypatch.setattr(torch, "compile", failing_compile)
    assert main(fuse_arguments(tmp_path, weights_file, "compiled", "--compile")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "tdfusion fuse: warning: torch.compile failed (RuntimeError: no C++ compiler found); "
        "running the network uncompiled"
    ]
    assert png_bytes(tmp_path / "compiled") == png_bytes(tmp_path / "eager")


# --- the options in the Python API ----------------------------------------------------------


def test_channels_last_fuses_like_the_default_within_1e_5():
    torch.manual_seed(0)
    net = ReFusionNet(**SMALL).eval()
    generator = torch.Generator().manual_seed(3)
    a, b = (torch.rand(1, 1, 96, 200, generator=generator) for _ in range(2))  # several bands
    reference = fuse_tensors(net, a, b)
    fused = fuse_tensors(accelerate(net, channels_last=True), a, b)
    assert (fused - reference).abs().max() <= 1e-5


def test_the_options_reach_load_fusion_model_fuse_files_and_fuse_folders(tmp_path):
    write_pair(tmp_path, "a")
    assert isinstance(load_fusion_model(device="cpu"), ReFusionNet)
    fast = load_fusion_model(device="cpu", precision="bf16", channels_last=True)
    assert isinstance(fast, AcceleratedFusion) and fast.precision == "bf16"
    assert fast.model.head_conv.weight.is_contiguous(memory_format=torch.channels_last)
    net = load_fusion_model(device="cpu")
    files = (tmp_path / "ir" / "a.png", tmp_path / "vi" / "a.png")
    reference = fuse_files(net, *files).astype(int)
    assert 0 < np.abs(fuse_files(net, *files, precision="bf16").astype(int) - reference).max() <= 3
    report = fuse_folders(
        net, tmp_path / "ir", tmp_path / "vi", tmp_path / "o", precision="bf16", progress=False
    )
    assert np.abs(pixels(report.written[0]) - reference).max() <= 3
    with pytest.raises(ValueError, match="precision must be one of"):
        fuse_files(net, *files, precision="fp8")


def test_bf16_stays_within_1e_2_of_fp32_on_a_real_pair_with_the_bundled_weights(shared_data):
    """Measured on the six 480x640 MSRS example pairs: 7.5e-3 to 9.9e-3 (at most 3 grey
    levels); on these 120x160 crops, 6e-3 to 7e-3."""
    from tdfusion.data.io import read_luma

    net = load_fusion_model(device="cpu")
    folder = shared_data / "MSRS" / "example"
    for name in ("00004N.png", "00091D.png"):
        a, b = (
            torch.from_numpy(read_luma(folder / role / name)[0][:120, :160].copy())[None, None]
            for role in ("ir", "vi")
        )
        difference = (
            fuse_tensors(accelerate(net, precision="bf16"), a, b) - fuse_tensors(net, a, b)
        ).abs()
        assert 1e-4 < difference.max() < 1.2e-2, name
        assert difference.mean() < 2e-3, name


class CompilerError(RuntimeError):
    """Stands for the errors of torch's compiler, which come from these modules."""


CompilerError.__module__ = "torch._dynamo.exc"


def test_a_compiler_error_at_a_later_call_falls_back_but_other_errors_do_not(monkeypatch):
    class Recompile:
        calls = 0

        def __call__(self, model, **options):
            def compiled(a, b):
                Recompile.calls += 1
                if a.shape[-1] == 24:  # a new size: recompiling fails
                    raise CompilerError("recompiling for 16x24 failed")
                if a.shape[-1] == 28:
                    raise RuntimeError("out of memory")
                return model(a, b)

            return compiled

    monkeypatch.setattr(torch, "compile", Recompile())
    net = ReFusionNet(**SMALL).eval()
    fast = accelerate(net, compile=True)
    a, b = torch.rand(1, 1, 16, 20), torch.rand(1, 1, 16, 20)
    fuse_tensors(fast, a, b)
    assert fast.compiled is True
    with pytest.raises(RuntimeError, match="out of memory"):
        fast(torch.rand(1, 1, 16, 28), torch.rand(1, 1, 16, 28))
    assert fast.compiled is True
    wider = torch.rand(1, 1, 16, 24), torch.rand(1, 1, 16, 24)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .CompilerError: recompiling"):
        fused = fuse_tensors(fast, *wider)
    assert fast.compiled is False
    torch.testing.assert_close(fused, fuse_tensors(net, *wider), rtol=0, atol=0)
