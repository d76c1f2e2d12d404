"""Data: image reading, labels, datasets of the standard layouts, transforms, swap and collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tdfusion.data import (
    Compose,
    DetectionPairDataset,
    FMBDataset,
    LLVIPDataset,
    M3FDDataset,
    MSRSDataset,
    PairedImageDataset,
    RandomCrop,
    RandomHorizontalFlip,
    RandomVerticalFlip,
    Resize,
    SwapSources,
    detection_collate,
    read_image,
    read_luma,
    read_mask,
    read_voc_boxes,
    read_yolo_boxes,
    rgb_to_ycrcb,
    sample_dataset,
    sample_folders,
    swap_sources,
    write_image,
    ycrcb_to_rgb,
)
from tdfusion.errors import DataError


# ---------------------------------------------------------------------- image reading
def test_colour_conversion_round_trip_and_reference_values():
    rgb = np.random.default_rng(0).uniform(0, 255, (5, 7, 3))
    np.testing.assert_allclose(ycrcb_to_rgb(rgb_to_ycrcb(rgb)), rgb, atol=1e-9)
    y, cr, cb = rgb_to_ycrcb(np.array([255.0, 0.0, 0.0]))
    assert y == pytest.approx(76.245) and cr == pytest.approx((255 - 76.245) * 0.713 + 128)
    assert cb == pytest.approx((0 - 76.245) * 0.564 + 128)


@pytest.mark.parametrize(
    ("mode", "maker"),
    [
        ("L", lambda v: Image.fromarray(v)),
        ("RGB-grey", lambda v: Image.fromarray(np.stack([v] * 3, -1))),
        ("RGBA", lambda v: Image.fromarray(np.dstack([v, v // 2, v // 3, np.full_like(v, 7)]))),
        ("I;16", lambda v: Image.fromarray(v.astype(np.uint16) * 257)),
        ("P", lambda v: Image.fromarray(v).convert("P")),
    ],
)
def test_read_luma_handles_every_storage(tmp_path, mode, maker):
    values = np.arange(0, 240, dtype=np.uint8).reshape(12, 20)
    path = tmp_path / "image.png"
    maker(values).save(path)
    luma, chroma = read_luma(path)
    assert luma.dtype == np.float32 and luma.shape == (12, 20)
    assert 0.0 <= luma.min() and luma.max() <= 1.0
    if mode in ("L", "RGB-grey", "I;16"):
        np.testing.assert_allclose(luma * 255, values, atol=1e-3)
        assert chroma is None  # grey stored as RGB counts as grey
    if mode == "RGBA":  # alpha dropped, luma of the colour planes
        rgb = np.dstack([values, values // 2, values // 3]).astype(np.float64)
        np.testing.assert_allclose(luma * 255, rgb @ [0.299, 0.587, 0.114], atol=1e-3)
        assert chroma is not None and chroma.shape == (12, 20, 2)


def test_read_image_errors_name_the_file(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="broken.png"):
        read_image(broken)
    with pytest.raises(DataError, match="missing.png does not exist"):
        read_image(tmp_path / "missing.png")


def test_write_image_rounds_and_clips(tmp_path):
    path = write_image(tmp_path / "out" / "x.png", np.array([[-3.0, 12.6, 300.0]]))
    assert np.asarray(Image.open(path)).tolist() == [[0, 13, 255]]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["x.png"]


def test_every_real_image_reads(shared_data):
    for path in sorted((shared_data / "MSRS" / "example").glob("*/*.png")) + sorted(
        (shared_data / "LLVIP" / "example").glob("*/*.jpg")
    ):
        luma, _ = read_luma(path)
        assert luma.shape in ((480, 640), (1024, 1280)), path


# ---------------------------------------------------------------------- labels
def test_yolo_labels_and_their_errors(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("0 0.5 0.5 0.2 0.3\n\n2 0.1 0.2 0.05 0.05\n")
    boxes = read_yolo_boxes(path, num_classes=3)
    assert boxes.shape == (2, 5) and boxes[1, 0] == 2
    assert read_yolo_boxes(tmp_path / "none.txt").shape == (0, 5)
    cases = {
        "0 0.5 0.5 0.2\n": "a.txt:1: expected 5 fields",
        "0 0.5 0.5 0.2 0.2\n0 x 0.5 0.2 0.2\n": "a.txt:2: fields must be numbers",
        "7 0.5 0.5 0.2 0.2\n": "a.txt:1: class 7 is out of range for 3 classes",
        "0 1.5 0.5 0.2 0.2\n": "a.txt:1: coordinates must be normalised",
        "1.5 0.5 0.5 0.2 0.2\n": "a.txt:1: the class must be a non-negative integer",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_yolo_boxes(path, num_classes=3)


def voc(path, objects, size=(100, 200)):
    items = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
        f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
        for name, (x0, y0, x1, y1) in objects
    )
    path.write_text(
        f"<annotation><size><width>{size[1]}</width><height>{size[0]}</height></size>{items}"
        "</annotation>"
    )


def test_voc_annotations_and_their_errors(tmp_path):
    path = tmp_path / "a.xml"
    voc(path, [("Car", (20, 10, 60, 50)), ("people", (0, 0, 10, 100))])
    boxes = read_voc_boxes(path, ["People", "Car"])
    torch.testing.assert_close(boxes[0], torch.tensor([1.0, 0.2, 0.3, 0.2, 0.4]))
    assert boxes[1, 0] == 0
    voc(path, [("Dragon", (0, 0, 5, 5))])
    with pytest.raises(DataError, match=r"a.xml: object 1 has class 'Dragon'"):
        read_voc_boxes(path, ["People"])
    path.write_text("<annotation><size>")
    with pytest.raises(DataError, match="cannot read annotation"):
        read_voc_boxes(path, ["People"])


def test_masks_are_class_indices_and_checked(tmp_path):
    Image.fromarray(np.array([[0, 1], [2, 255]], dtype=np.uint8)).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", 3).tolist() == [[0, 1], [2, 255]]
    with pytest.raises(DataError, match="holds class 2, out of range for 2 classes"):
        read_mask(tmp_path / "m.png", 2)
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="expected a single-channel image"):
        read_mask(tmp_path / "rgb.png")


# ---------------------------------------------------------------------- datasets
def write_pairs(root, names, size=(24, 32), ir="ir", vis="vi", suffix=".png"):
    rng = np.random.default_rng(0)
    for folder in (ir, vis):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(
            root / ir / f"{name}{suffix}"
        )
        rgb = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(root / vis / f"{name}{suffix}")


def test_paired_dataset_reads_pairs_and_names_problems(tmp_path):
    write_pairs(tmp_path, ["a", "b"])
    dataset = PairedImageDataset(tmp_path / "ir", tmp_path / "vi")
    a, b, name = dataset[0]
    assert a.shape == b.shape == (1, 24, 32) and name == "a" and a.dtype == torch.float32
    with pytest.raises(DataError, match="infrared folder .*nothing.* does not exist"):
        PairedImageDataset(tmp_path / "nothing", tmp_path / "vi")
    (tmp_path / "ir" / "c.png").write_bytes((tmp_path / "ir" / "a.png").read_bytes())
    with pytest.raises(DataError, match=r"unpaired images: .*c.png has no visible counterpart"):
        PairedImageDataset(tmp_path / "ir", tmp_path / "vi")
    (tmp_path / "ir" / "c.png").unlink()
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "vi" / "b.png")
    dataset = PairedImageDataset(tmp_path / "ir", tmp_path / "vi")
    with pytest.raises(
        DataError, match=r"size mismatch within a pair: .*b.png is 32x24 .*b.png is 10x10"
    ):
        dataset[1]
    (tmp_path / "vi" / "a.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read image .*a.png"):
        dataset[0]


def test_msrs_layouts_for_both_tasks(tmp_path):
    write_pairs(tmp_path / "train", ["00001D", "00002N"])
    (tmp_path / "train" / "Segmentation_labels").mkdir()
    for name in ("00001D", "00002N"):
        Image.fromarray(np.full((24, 32), 3, dtype=np.uint8)).save(
            tmp_path / "train" / "Segmentation_labels" / f"{name}.png"
        )
    segmentation = MSRSDataset(tmp_path, "train", mask_size=(12, 16))
    a, b, mask = segmentation[1]
    assert mask.shape == (12, 16) and mask.dtype == torch.int64 and int(mask[0, 0]) == 3
    (tmp_path / "label" / "fusion").mkdir(parents=True)
    (tmp_path / "label" / "fusion" / "00001D.txt").write_text("2 0.5 0.5 0.25 0.25\n")
    detection = MSRSDataset(tmp_path, "train", task="detection")
    assert detection[0][2].tolist() == [[2.0, 0.5, 0.5, 0.25, 0.25]]
    assert detection[1][2].shape == (0, 5)
    with pytest.raises(DataError, match="no MSRS detection label folder found"):
        MSRSDataset(tmp_path, "train", task="detection", label_set="visible")


def test_msrs_example_folder_from_the_shared_data(shared_data):
    dataset = MSRSDataset(
        shared_data / "MSRS" / "example", split=None, task="detection", label_set="infrared"
    )
    assert len(dataset) == 6
    a, b, boxes = dataset[0]
    assert a.shape == (1, 480, 640) and boxes.shape[1] == 5 and len(boxes) > 0


def test_fmb_m3fd_llvip_layouts(tmp_path):
    write_pairs(tmp_path / "fmb" / "test", ["x"], ir="Infrared", vis="Visible")
    (tmp_path / "fmb" / "test" / "Label").mkdir()
    Image.fromarray(np.full((24, 32), 14, dtype=np.uint8)).save(
        tmp_path / "fmb" / "test" / "Label" / "x.png"
    )
    assert int(FMBDataset(tmp_path / "fmb", "test")[0][2].max()) == 14

    names = [f"{i:05d}" for i in range(8)]
    write_pairs(tmp_path / "m3fd", names, ir="Ir", vis="Vis")
    (tmp_path / "m3fd" / "Annotation").mkdir()
    for name in names:
        voc(tmp_path / "m3fd" / "Annotation" / f"{name}.xml", [("Truck", (1, 1, 20, 20))], (24, 32))
    train, test = M3FDDataset(tmp_path / "m3fd", "train"), M3FDDataset(tmp_path / "m3fd", "test")
    assert len(train) == 6 and len(test) == 2 and not set(train.names) & set(test.names)
    assert train.names == M3FDDataset(tmp_path / "m3fd", "train").names  # deterministic
    assert train[0][2][0, 0] == 5  # Truck

    write_pairs(tmp_path / "llvip", names, ir="infrared/train", vis="visible/train", suffix=".jpg")
    (tmp_path / "llvip" / "Annotations").mkdir()
    voc(tmp_path / "llvip" / "Annotations" / "00000.xml", [("person", (2, 2, 12, 22))], (24, 32))
    llvip = LLVIPDataset(tmp_path / "llvip", "train", stride=3)
    assert llvip.names == ["00000", "00003", "00006"]
    assert llvip[0][2].shape == (1, 5) and llvip[1][2].shape == (0, 5)


def test_bundled_sample():
    dataset = sample_dataset()
    assert len(dataset) == 4 and dataset.classes == ("person", "bicycle", "car")
    for index in range(4):
        a, b, boxes = dataset[index]
        assert a.shape == (1, 480, 640) and len(boxes) > 0
        assert set(boxes[:, 0].tolist()) <= {0.0, 1.0, 2.0}
    ir_dir, vis_dir = sample_folders()
    assert (ir_dir.parent / "ATTRIBUTION.md").is_file()
    assert (ir_dir.parent / "LICENSE-SuperFusion.txt").is_file()


# ---------------------------------------------------------------------- transforms
def box_sample(size=(40, 60)):
    """Images with one bright rectangle and its box."""
    height, width = size
    image = torch.zeros(1, height, width)
    image[:, 10:20, 30:50] = 1.0  # rows 10-19, columns 30-49
    box = torch.tensor([[1.0, 40 / width, 15 / height, 20 / width, 10 / height]])
    return image, image.clone(), box


def box_region(image, box):
    height, width = image.shape[-2:]
    _, xc, yc, w, h = box.tolist()
    x0, x1 = round((xc - w / 2) * width), round((xc + w / 2) * width)
    y0, y1 = round((yc - h / 2) * height), round((yc + h / 2) * height)
    return image[..., y0:y1, x0:x1]


@pytest.mark.parametrize(
    "transform",
    [
        RandomHorizontalFlip(p=1.0),
        RandomVerticalFlip(p=1.0),
        Resize((20, 30)),
        RandomCrop((30, 45), generator=torch.Generator().manual_seed(1)),
        Compose(
            [RandomHorizontalFlip(1.0), RandomCrop(32, generator=torch.Generator().manual_seed(2))]
        ),
    ],
)
def test_boxes_follow_geometric_transforms(transform):
    a, b, boxes = transform(box_sample())
    assert torch.equal(a, b)
    assert len(boxes) == 1
    inside = box_region(a, boxes[0])
    assert inside.numel() > 0 and inside.mean() > 0.9  # the box still covers the rectangle
    assert a.sum() > 0 and inside.sum() >= 0.8 * a.sum()


def test_crop_drops_boxes_that_leave_the_window_and_masks_follow():
    image, _, boxes = box_sample()
    mask = (image[0] > 0).long()
    crop = RandomCrop((10, 25), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    for _ in range(20):
        a, _, cropped = crop((image, image, boxes))
        if a.sum() == 0:
            assert len(cropped) == 0
        _, _, cropped_mask = crop((image, image, mask))
        assert cropped_mask.shape == (10, 25)
    flipped = RandomHorizontalFlip(1.0)((image, image, mask))
    assert torch.equal(flipped[2].float(), flipped[0][0])


def test_swap_sources_and_collate():
    samples = [box_sample(), box_sample()]
    samples[1] = (samples[1][0] * 0.5, samples[1][1], samples[1][2])
    a, b, targets = detection_collate(samples)
    assert a.shape == (2, 1, 40, 60) and targets.shape == (2, 6)
    assert targets[:, 0].tolist() == [0.0, 1.0]
    swapped_a, swapped_b, doubled = swap_sources((a, b, targets))
    assert (
        swapped_a.shape[0] == 4 and torch.equal(swapped_a[2:], b) and torch.equal(swapped_b[2:], a)
    )
    assert doubled[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    masks = torch.zeros(2, 4, 4, dtype=torch.long)
    assert swap_sources((a, b, masks))[2].shape == (4, 4, 4)
    assert swap_sources((a, b, ["x", "y"]))[2] == ["x", "y", "x", "y"]
    with pytest.raises(ValueError, match="cannot duplicate the target"):
        swap_sources((a, b, 3))
    loader = torch.utils.data.DataLoader(
        samples, batch_size=2, collate_fn=SwapSources(detection_collate)
    )
    batch = next(iter(loader))
    assert batch[0].shape[0] == 4 and batch[2].shape == (4, 6)


def test_detection_dataset_with_transform(tmp_path):
    write_pairs(tmp_path, ["a"], size=(40, 60))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    dataset = DetectionPairDataset(
        tmp_path / "ir",
        tmp_path / "vi",
        tmp_path / "labels",
        ["person"],
        transform=Resize((20, 30)),
    )
    a, b, boxes = dataset[0]
    assert a.shape == (1, 20, 30)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.5, 0.5, 0.2, 0.2]]))
