"""Argument checking shared by the sub-commands: every bad argument gets one line and exit 2."""

from __future__ import annotations

import pytest
import torch

from tdfusion.cli import main


@pytest.fixture
def places(tmp_path):
    """A folder, a plain file and a text file posing as weights."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("not a folder\n")
    return tmp_path


def fuse(places, *extra):
    folder = str(places / "folder")
    return ["fuse", "--ir", folder, "--vis", folder, "--out", str(places / "out"),
            "--weights", str(places / "w.pt"), *extra]  # fmt: skip


def weights(places, *extra):
    folder = str(places / "folder")
    return ["weights", "--ir", folder, "--vis", folder, "--out", str(places / "out"),
            "--checkpoint", str(places / "g.pt"), *extra]  # fmt: skip


def evaluate(places, *extra):
    return ["evaluate", "--fused", "f", "--ir", "i", "--vis", "v", *extra]


def train(places, *extra):
    return ["train", *extra]


def demo(places, *extra):
    return ["demo", *extra]


def benchmark(places, *extra):
    return ["benchmark", "--dataset", "msrs", "--data-root", str(places / "folder"),
            "--models", "mean", *extra]  # fmt: skip


BAD_ARGUMENTS = [
    (fuse, ["--tile", "0"], "argument --tile: expected a positive integer, got 0"),
    (fuse, ["--tile", "-1"], "argument --tile: expected a positive integer, got -1"),
    (fuse, ["--tile", "x"], "argument --tile: expected a positive integer, got 'x'"),
    (fuse, ["--batch", "0"], "argument --batch: expected a positive integer, got 0"),
    (fuse, ["--batch", "-5"], "argument --batch: expected a positive integer, got -5"),
    (fuse, ["--overlap", "-1"], "argument --overlap: expected an integer of at least 0"),
    (fuse, ["--tile", "16"], "--tile 16 must be at least twice --overlap 32"),
    (fuse, ["--tile", "40"], "--tile 40 must be at least twice --overlap 32"),
    (fuse, ["--tile", "9", "--overlap", "8"], "--tile 9 must be at least twice --overlap 8"),
    (fuse, ["--weights", "{folder}"], "folder is a directory; expected a weights file"),
    (fuse, ["--out", "{file}"], "file.txt is a file; expected a folder"),
    (fuse, ["--device", "gpu"], "unknown device 'gpu'; expected cpu, cuda, cuda:N or mps"),
    (fuse, ["--device", "cuda:x"], "unknown device 'cuda:x'"),
    (fuse, ["--precision", "fp64"], "argument --precision: invalid choice: 'fp64'"),
    (fuse, ["--precision", "half"], "argument --precision: invalid choice: 'half'"),
    (fuse, ["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a GPU"),
    (fuse, ["--compile=yes"], "argument --compile: ignored explicit argument 'yes'"),
    (fuse, ["--channels-last=1"], "argument --channels-last: ignored explicit argument '1'"),
    (weights, ["--checkpoint", "{folder}"], "folder is a directory; expected a weights file"),
    (weights, ["--out", "{file}"], "file.txt is a file; expected a folder"),
    (weights, ["--device", "gpu"], "unknown device 'gpu'"),
    (evaluate, ["--jobs", "0"], "argument --jobs: expected a positive integer, got 0"),
    (train, ["--smoke", "--epochs", "0"], "--epochs"),
    (train, ["--batch-size", "-1"], "got -1"),
    (train, ["--lr", "0"], "expected a positive number"),
    (train, ["--lr", "nan"], "expected a positive number"),
    (train, ["--num-workers", "-1"], "at least 0"),
    (train, ["--task-size", "0", "64"], "--task-size"),
    (train, ["--out", "{file}"], "is a file"),
    (train, ["--device", "gpu"], "unknown device"),
    (demo, ["--epochs", "0"], "positive integer"),
    (demo, ["--meta-steps", "-1"], "at least 0"),
    (demo, ["--out", "{file}"], "is a file"),
    (benchmark, ["--epochs", "0"], "argument --epochs: expected a positive integer, got 0"),
    (benchmark, ["--seeds"], "argument --seeds: expected at least one argument"),
    (benchmark, ["--lr", "-1"], "expected a positive number"),
    (benchmark, ["--dataset", "kitti"], "argument --dataset: invalid choice: 'kitti'"),
    (benchmark, ["--device", "gpu"], "unknown device 'gpu'"),
]


def test_benchmark_names_the_missing_folder_of_the_layout(places, capsys):
    assert main(benchmark(places)) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert f"MSRS infrared folder {places / 'folder' / 'train' / 'ir'} does not exist" in error


@pytest.mark.parametrize("command, extra, expected", BAD_ARGUMENTS)
def test_bad_arguments_get_one_line_and_exit_2(places, capsys, command, extra, expected):
    extra = [value.format(folder=places / "folder", file=places / "file.txt") for value in extra]
    arguments = command(places, *extra)
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert error.startswith(f"tdfusion {arguments[0]}: error: ") and expected in error
    assert not (places / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_gets_one_line(places, capsys, device):
    with pytest.raises(SystemExit) as exit_:
        main(fuse(places, "--device", device))
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert f"device '{device}': CUDA is not available on this machine" in error


@pytest.mark.parametrize("command, flag", [(fuse, "--weights"), (weights, "--checkpoint")])
def test_a_text_file_as_weights_gets_one_line(places, capsys, command, flag):
    arguments = command(places, flag, str(places / "file.txt"), "--device", "cpu")
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1
    assert "file.txt as a weights-only torch file: it is not a file of weights" in error
    assert "weights_only" not in error


def test_train_help_says_what_resuming_keeps_and_no_resume_deletes(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "checkpoint.pt, fusion_model.pt and loss_generator.pt in OUT are deleted" in text
    assert "must keep the settings of OUT/recipe.json except --epochs" in text


def test_a_train_rerun_with_other_settings_gets_one_line_and_keeps_recipe_json(tmp_path, capsys):
    out = tmp_path / "run"
    arguments = ["train", "--recipe", "roadscene-pretrain", "--smoke", "--device", "cpu"]
    arguments += ["--out", str(out)]
    assert main(arguments) == 0
    saved = (out / "recipe.json").read_bytes()
    capsys.readouterr()
    assert main([*arguments, "--epochs", "2", "--lr", "5e-4"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert "lr 0.001 -> 0.0005" in error and "--no-resume" in error
    assert (out / "recipe.json").read_bytes() == saved
    assert main([*arguments, "--epochs", "2"]) == 0  # training further resumes
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
