"""``tdfusion benchmark``: fuse a labelled dataset per model, retrain the task, print the table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tdfusion.benchmark import (
    BenchmarkSettings,
    FusedSet,
    format_table,
    fuse_dataset,
    load_fusion,
    run_benchmark,
)
from tdfusion.cli import main
from tdfusion.data import MSRSDataset, sample_dataset
from tdfusion.nets import ReFusionNet

SIZE = (64, 80)  # the sample pairs, shrunk so that the whole protocol takes seconds


def _write_small_msrs(root, split, names):
    """The bundled sample in the MSRS segmentation layout at SIZE (masks from the boxes)."""
    sample = sample_dataset()
    for folder in ("ir", "vi", "Segmentation_labels"):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(sample.names):
        if name not in names:
            continue
        a, b, boxes = sample[index]
        for folder, image in (("ir", a), ("vi", b)):
            grey = (image[0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(grey).resize(SIZE[::-1], Image.BILINEAR).save(
                root / split / folder / f"{name}.png"
            )
        mask = np.zeros(SIZE, dtype=np.uint8)
        for label, xc, yc, w, h in boxes.tolist():
            x0, x1 = int((xc - w / 2) * SIZE[1]), int(np.ceil((xc + w / 2) * SIZE[1]))
            y0, y1 = int((yc - h / 2) * SIZE[0]), int(np.ceil((yc + h / 2) * SIZE[0]))
            mask[y0:y1, x0:x1] = 2 if label == 0 else 1  # MSRS: 1 car, 2 person
        Image.fromarray(mask).save(root / split / "Segmentation_labels" / f"{name}.png")


@pytest.fixture(scope="module")
def small_msrs(tmp_path_factory):
    root = tmp_path_factory.mktemp("msrs")
    names = sample_dataset().names
    _write_small_msrs(root, "train", names[:3])
    _write_small_msrs(root, "test", names[3:])
    return root


SETTINGS = BenchmarkSettings("msrs", epochs=1, batch_size=3, task_size=SIZE)


def test_fused_sets_are_eight_bit_at_the_task_size(small_msrs):
    dataset = MSRSDataset(small_msrs, "train", mask_size=SIZE)
    fused = fuse_dataset(load_fusion("max"), dataset, (32, 40))
    assert fused.images.dtype == torch.uint8 and fused.images.shape == (3, 1, 32, 40)
    a, b = dataset.read_pair(0)
    expected = torch.nn.functional.interpolate(
        torch.maximum(a, b)[None], size=(32, 40), mode="bilinear", align_corners=False
    )
    assert torch.equal(fused.images[0].float(), (expected[0] * 255).round())


def test_benchmark_retrains_the_same_schedule_for_every_model(small_msrs, tmp_path):
    checkpoint = ReFusionNet(dim=8, num_heads=4).save_pretrained(tmp_path / "tiny.pt")
    result = run_benchmark(
        ["infrared", "same=infrared", f"tiny={checkpoint}"],
        small_msrs,
        SETTINGS,
        device="cpu",
        progress=False,
    )
    assert list(result["rows"]) == ["infrared", "same", "tiny"]
    assert result["columns"][-2:] == ["mAcc", "mIoU"] and len(result["columns"]) == 11

    # the same fused images and seed give the same task network and scores
    def values(label):
        return np.array([[s[c] for c in result["columns"]] for s in result["rows"][label]["seeds"]])

    assert np.array_equal(values("infrared"), values("same"), equal_nan=True)
    assert not np.array_equal(values("tiny"), values("same"), equal_nan=True)
    table = result["table"]
    assert "MSRS segmentation" in table
    assert table.splitlines()[1].split()[-1] == "mIoU"


def test_format_table_prints_detection_columns_and_dashes_for_missing_classes():
    result = {
        "settings": {"dataset": "m3fd", "task": "detection", "epochs": 3, "seeds": [0]},
        "columns": ["mAP50", "mAP75", "mAP50-95"],
        "rows": {"model": {"mean": {"mAP50": 12.34, "mAP75": 5.0, "mAP50-95": float("nan")}}},
    }
    lines = format_table(result).splitlines()
    assert lines[1].split() == ["model", "mAP50", "mAP75", "mAP50-95"]
    assert lines[2].split() == ["model", "12.3", "5.0", "-"]


def test_fused_set_collates_detection_boxes_with_their_batch_index():
    boxes = [torch.tensor([[1.0, 0.5, 0.5, 0.1, 0.1]]), torch.zeros(0, 5), torch.ones(2, 5)]
    fused = FusedSet(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), boxes, ["a", "b", "c"])
    images, targets = fused.batch([2, 0], "detection")
    assert images.shape == (2, 1, 4, 4)
    assert targets[:, 0].tolist() == [0.0, 0.0, 1.0]


def test_benchmark_command_prints_the_table_and_writes_json(small_msrs, tmp_path, capsys):
    out = tmp_path / "result.json"
    status = main(
        [
            "benchmark", "--dataset", "msrs", "--data-root", str(small_msrs), "--models", "max",
            "--epochs", "1", "--batch-size", "3", "--task-size", "64", "80", "--device", "cpu",
            "--seeds", "0", "1", "--json", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "mean ± std over seeds" in printed
    row = next(line for line in printed.splitlines() if line.startswith("max"))
    assert "±" in row
    saved = json.loads(out.read_text())["rows"]["max"]
    assert saved["spec"] == "max" and len(saved["seeds"]) == 2


def test_benchmark_refuses_duplicate_labels(small_msrs):
    with pytest.raises(ValueError, match="labels must differ"):
        run_benchmark(["max", "max"], small_msrs, SETTINGS, device="cpu", progress=False)


def test_masks_are_scored_at_the_task_size_when_the_images_are_larger(small_msrs):
    """The labels are 64x80 like the images; the task runs at 32x40."""
    dataset = MSRSDataset(small_msrs, "train", mask_size=(32, 40))
    fused = fuse_dataset(load_fusion("max"), dataset, (32, 40))
    assert all(tuple(mask.shape) == (32, 40) for mask in fused.targets)
    assert torch.equal(fused.targets[0], dataset[0][2])  # what training reads
    settings = BenchmarkSettings("msrs", epochs=1, batch_size=3, task_size=(32, 40))
    result = run_benchmark(["max"], small_msrs, settings, device="cpu", progress=False)
    assert result["rows"]["max"]["mean"]["mIoU"] >= 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--models", "max", "max"], "--models gives the label max to several models"),
        (["--models", "a=max", "a=mean"], "--models gives the label a to several models"),
        (["--models", "max", "--seeds", "1", "1"], "--seeds repeats 1"),
    ],
)
def test_benchmark_command_refuses_repeats_in_one_line(small_msrs, capsys, arguments, message):
    with pytest.raises(SystemExit) as exited:
        main(["benchmark", "--dataset", "msrs", "--data-root", str(small_msrs), *arguments])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]


def test_a_missing_model_file_fails_before_any_model_is_trained(
    small_msrs, tmp_path, monkeypatch, capsys
):
    import tdfusion.benchmark as benchmark

    def never(*args, **kwargs):
        raise AssertionError("trained before every model was read")

    monkeypatch.setattr(benchmark, "train_and_score", never)
    missing = tmp_path / "missing.pt"
    status = main(
        [
            "benchmark", "--dataset", "msrs", "--data-root", str(small_msrs),
            "--models", "max", f"ours={missing}", "--device", "cpu",
        ]
    )  # fmt: skip
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "model 'ours'" in error[0] and "missing.pt" in error[0]
