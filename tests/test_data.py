"""Data: image reading, labels, datasets of the standard layouts, transforms, swap and collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tdfusion.data import (
    DetectionPairDataset,
    FMBDataset,
    LLVIPDataset,
    M3FDDataset,
    MSRSDataset,
    PairedImageDataset,
    RandomHorizontalFlip,
    Resize,
    read_image,
    read_luma,
    read_mask,
    read_voc_boxes,
    read_yolo_boxes,
    rgb_to_ycrcb,
    sample_dataset,
    sample_folders,
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
    paths = sorted((shared_data / "MSRS" / "example").glob("*/*.png"))
    paths += sorted((shared_data / "LLVIP" / "example").glob("*/*.jpg"))
    assert len(paths) == 24
    for path in paths:
        luma, chroma = read_luma(path)
        assert luma.shape in ((480, 640), (1024, 1280)), path
        assert luma.dtype == np.float32 and 0 <= luma.min() and luma.max() <= 1, path
        assert 0 < luma.std(), path
        # Infrared is grey (LLVIP stores it as 3 equal planes); visible is colour.
        assert (chroma is None) == (path.parent.name == "ir"), path
        if chroma is not None:
            assert chroma.shape == (*luma.shape, 2)


# ---------------------------------------------------------------------- labels
def test_yolo_labels_and_their_errors(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("0 0.5 0.5 0.2 0.3\n\n2 0.1 0.2 0.05 0.05\n")
    boxes = read_yolo_boxes(path, num_classes=3)
    assert boxes.shape == (2, 5) and boxes[1, 0] == 2
    assert read_yolo_boxes(tmp_path / "none.txt").shape == (0, 5)
    path.write_bytes(b"\xef\xbb\xbf1 0.5 0.5 0.2 0.3\r\n")  # a byte-order mark, CRLF endings
    assert read_yolo_boxes(path, num_classes=3).tolist()[0][0] == 1.0
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
    for name in ("c", "d", "e", "f"):
        (tmp_path / "ir" / f"{name}.png").write_bytes((tmp_path / "ir" / "a.png").read_bytes())
    (tmp_path / "vi" / "z.png").write_bytes((tmp_path / "vi" / "a.png").read_bytes())
    with pytest.raises(DataError, match=r"unpaired images") as error:
        PairedImageDataset(tmp_path / "ir", tmp_path / "vi")
    message = str(error.value)
    assert "4 only in" in message and "(c.png, d.png, e.png, ...)" in message
    assert "1 only in" in message and "(z.png)" in message and "f.png" not in message
    for name in ("c", "d", "e", "f"):
        (tmp_path / "ir" / f"{name}.png").unlink()
    (tmp_path / "vi" / "z.png").unlink()
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


# ---------------------------------------------------------------------- more image storages
def test_palette_and_luminance_alpha_images(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(colors=16)
    palette.save(tmp_path / "palette.png")
    expanded = np.asarray(palette.convert("RGB"), dtype=np.float64)
    luma, chroma = read_luma(tmp_path / "palette.png")
    np.testing.assert_allclose(luma * 255, expanded @ [0.299, 0.587, 0.114], atol=1e-3)
    np.testing.assert_allclose(chroma, rgb_to_ycrcb(expanded)[..., 1:], atol=1e-6)
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(np.dstack([grey, np.full_like(grey, 9)]), mode="LA").save(tmp_path / "la.png")
    luma, chroma = read_luma(tmp_path / "la.png")
    np.testing.assert_allclose(luma * 255, grey, atol=1e-3)
    assert chroma is None


def test_sixteen_bit_full_range_and_clipping(tmp_path):
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    luma, _ = read_luma(tmp_path / "deep.png")
    np.testing.assert_allclose(luma, values / 65535.0, atol=1e-6)
    Image.fromarray(np.array([[-5.0, 100.0, 400.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert read_image(tmp_path / "f.tif").tolist() == [[0.0, 100.0, 255.0]]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_images_with_non_finite_pixels_are_refused_naming_the_file(tmp_path, bad):
    values = np.array([[0.0, 100.0], [bad, 255.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "poisoned.tif")
    with pytest.raises(DataError, match=r"poisoned\.tif has 1 NaN or infinite pixel"):
        read_image(tmp_path / "poisoned.tif")


def test_an_image_that_decodes_to_no_pixels_is_refused_naming_the_file(tmp_path, monkeypatch):
    # Pillow refuses to write or read a 0-pixel file; a decoder that hands one back is faked.
    import tdfusion.data.io as image_io

    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(tmp_path / "hollow.png")
    monkeypatch.setattr(image_io, "_to_array", lambda image: np.zeros((0, 5)))
    with pytest.raises(DataError, match=r"image .*hollow\.png is empty \(5x0 pixels\)"):
        read_image(tmp_path / "hollow.png")


def test_colour_round_trip_through_files(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    luma, chroma = read_luma(tmp_path / "colour.png")
    back = ycrcb_to_rgb(np.dstack([luma.astype(np.float64) * 255, chroma]))
    written = write_image(tmp_path / "back.png", back)
    np.testing.assert_array_equal(np.asarray(Image.open(written)), rgb)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_truncated_and_damaged_files_name_the_file(tmp_path, suffix):
    rgb = np.random.default_rng(3).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    good = tmp_path / f"good{suffix}"
    Image.fromarray(rgb).save(good)
    data = good.read_bytes()
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=f"cannot read image .*truncated{suffix}"):
        read_image(truncated)
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=f"empty{suffix}"):
        read_luma(empty)


def test_write_image_errors_and_single_channel(tmp_path):
    path = write_image(tmp_path / "one.png", np.full((2, 3, 1), 7.2))
    assert np.asarray(Image.open(path)).tolist() == [[7, 7, 7], [7, 7, 7]]
    with pytest.raises(DataError, match=r"expected an \(H, W\) or \(H, W, 3\) image"):
        write_image(tmp_path / "bad.png", np.zeros((2, 3, 5)))
    with pytest.raises(DataError, match=r"cannot write image .*x\.unknownformat"):
        write_image(tmp_path / "x.unknownformat", np.zeros((2, 3)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.png"]  # no temporary left


# ---------------------------------------------------------------------- labels: more cases
def test_voc_boxes_use_the_image_size_when_given(tmp_path):
    path = tmp_path / "nosize.xml"
    path.write_text(
        "<annotation><object><name>person</name><bndbox><xmin>10</xmin><ymin>20</ymin>"
        "<xmax>30</xmax><ymax>60</ymax></bndbox></object></annotation>"
    )
    with pytest.raises(DataError, match=r"nosize.xml: missing or bad <size>"):
        read_voc_boxes(path, ["person"])
    boxes = read_voc_boxes(path, ["person"], image_size=(80, 40))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.5, 0.5, 0.5, 0.5]]))
    voc(path, [("person", (-10, 5, 20, 500))], size=(100, 200))  # clipped to the image
    torch.testing.assert_close(
        read_voc_boxes(path, ["person"]), torch.tensor([[0.0, 0.05, 0.525, 0.1, 0.95]])
    )
    voc(path, [("person", (1, 2, "x", 4))])
    with pytest.raises(DataError, match=r"object 1 \(person\) has a missing or bad <bndbox>"):
        read_voc_boxes(path, ["person"])


def test_every_shared_msrs_label_file_parses(shared_data):
    files = sorted((shared_data / "MSRS" / "example" / "label").glob("*/*.txt"))
    assert len(files) == 18
    for path in files:
        boxes = read_yolo_boxes(path, num_classes=3)
        assert boxes.shape[1] == 5 and len(boxes) > 0, path


# ---------------------------------------------------------------------- datasets: more cases
def test_extensions_select_files(tmp_path):
    write_pairs(tmp_path, ["a", "b"])
    write_pairs(tmp_path, ["c"], suffix=".jpg")
    assert PairedImageDataset(tmp_path / "ir", tmp_path / "vi").names == ["a", "b", "c"]
    only_png = PairedImageDataset(tmp_path / "ir", tmp_path / "vi", extensions=["png"])
    assert only_png.names == ["a", "b"]
    with pytest.raises(ValueError, match=r"unsupported image extensions \['\.gif'\]"):
        PairedImageDataset(tmp_path / "ir", tmp_path / "vi", extensions=[".gif"])
    with pytest.raises(DataError, match=r"infrared folder .* holds no \.bmp image"):
        PairedImageDataset(tmp_path / "ir", tmp_path / "vi", extensions=[".bmp"])


def test_empty_folder_and_unknown_names(tmp_path):
    write_pairs(tmp_path, ["a"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"visible folder .*empty holds no image"):
        PairedImageDataset(tmp_path / "ir", tmp_path / "empty")
    with pytest.raises(DataError, match=r"no image pair named \['zz'\]"):
        PairedImageDataset(tmp_path / "ir", tmp_path / "vi", names=["zz"])


def test_a_label_folder_matching_no_image_is_an_error(tmp_path):
    write_pairs(tmp_path, ["a", "b"])
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "other.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DataError, match=r"labels holds no \.txt file for any of the 2 image pairs"):
        DetectionPairDataset(tmp_path / "ir", tmp_path / "vi", tmp_path / "labels", ["person"])
    with pytest.raises(DataError, match=r"label folder .*nowhere does not exist"):
        DetectionPairDataset(tmp_path / "ir", tmp_path / "vi", tmp_path / "nowhere", ["person"])


def test_bad_label_line_is_reported_when_the_item_is_read(tmp_path):
    write_pairs(tmp_path, ["a"])
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.1 0.1\n3 0.5 0.5 0.1 0.1\n")
    dataset = DetectionPairDataset(
        tmp_path / "ir", tmp_path / "vi", tmp_path / "labels", ["person", "car"]
    )
    with pytest.raises(DataError, match=r"a\.txt:2: class 3 is out of range for 2 classes"):
        dataset[0]


def test_segmentation_mask_problems_name_the_file(tmp_path):
    write_pairs(tmp_path / "train", ["a", "b"])
    labels = tmp_path / "train" / "Segmentation_labels"
    labels.mkdir()
    Image.fromarray(np.zeros((12, 16), dtype=np.uint8)).save(labels / "a.png")
    # A missing mask is found when the dataset is built, not when the item is read.
    with pytest.raises(DataError, match=r"lacks the mask of 1 of the 2 image pairs: b\.png"):
        MSRSDataset(tmp_path, "train")
    Image.fromarray(np.zeros((24, 32), dtype=np.uint8)).save(labels / "b.png")
    dataset = MSRSDataset(tmp_path, "train")
    with pytest.raises(DataError, match=r"a\.png is 16x12 but its images are 32x24"):
        dataset[0]
    (labels / "b.png").unlink()  # removed after the dataset was built: named when read
    with pytest.raises(DataError, match=r"segmentation label .*b\.png does not exist"):
        dataset[1]


def test_msrs_fusion_task_and_missing_folders(tmp_path):
    write_pairs(tmp_path / "test", ["x"])
    a, b, name = MSRSDataset(tmp_path, "test", task="fusion")[0]
    assert name == "x" and a.shape == (1, 24, 32)
    with pytest.raises(DataError, match=r"MSRS infrared folder .*train.ir does not exist"):
        MSRSDataset(tmp_path, "train")
    with pytest.raises(ValueError, match="task must be"):
        MSRSDataset(tmp_path, "test", task="classification")


@pytest.mark.parametrize("label_set", ["fusion", "infrared", "visible"])
def test_msrs_example_folder_every_label_set(shared_data, label_set):
    dataset = MSRSDataset(
        shared_data / "MSRS" / "example", split=None, task="detection", label_set=label_set
    )
    assert dataset.label_dir.name == label_set and len(dataset) == 6
    for index in range(len(dataset)):
        assert dataset[index][2].shape[1] == 5


def test_llvip_example_folder_from_the_shared_data(shared_data):
    root = shared_data / "LLVIP" / "example"
    dataset = LLVIPDataset(root, split=None, task="fusion", stride=2)
    assert dataset.names == ["190001", "190003", "190005"]
    a, b, name = dataset[0]
    assert a.shape == b.shape == (1, 1024, 1280) and name == "190001"
    assert not torch.equal(a, b)
    with pytest.raises(DataError, match=r"label folder .*Annotations does not exist"):
        LLVIPDataset(root, split=None)
    with pytest.raises(DataError, match=r"no LLVIP infrared folder found; looked for .*train"):
        LLVIPDataset(root, split="train", task="fusion")


def test_m3fd_split_is_disjoint_complete_and_seeded(tmp_path):
    names = [f"{i:05d}" for i in range(12)]
    write_pairs(tmp_path, names, size=(8, 8), ir="Ir", vis="Vis")
    (tmp_path / "Annotation").mkdir()
    for name in names:
        voc(tmp_path / "Annotation" / f"{name}.xml", [("Lamp", (1, 1, 4, 4))], (8, 8))
    train = M3FDDataset(tmp_path, "train", train_size=8)
    test = M3FDDataset(tmp_path, "test", train_size=8)
    assert len(train) == 8 and len(test) == 4
    assert sorted(train.names + test.names) == names
    assert M3FDDataset(tmp_path, "train", train_size=8, seed=1).names != train.names
    assert len(M3FDDataset(tmp_path, "all")) == 12
    assert train[0][2][0, 0] == 4  # Lamp


def test_bundled_sample_is_the_documented_pairs(shared_data):
    ir_dir, vis_dir = sample_folders()
    names = sorted(p.stem for p in ir_dir.glob("*.png"))
    assert names == ["00004N", "00036N", "00055D", "00091D"]
    for name in names:  # byte-identical copies of the MIT-licensed SuperFusion pairs
        for folder, shared in ((ir_dir, "ir"), (vis_dir, "vi")):
            original = shared_data / "MSRS" / "example" / shared / f"{name}.png"
            assert (folder / f"{name}.png").read_bytes() == original.read_bytes()


def test_bundled_sample_boxes_are_sane_and_on_warm_objects():
    dataset = sample_dataset()
    classes = (sample_folders()[0].parent / "classes.txt").read_text().split()
    assert classes == ["person", "bicycle", "car"]
    for index in range(len(dataset)):
        a, _, boxes = dataset[index]
        assert len(boxes) > 0
        corners = torch.cat([boxes[:, 1:3] - boxes[:, 3:] / 2, boxes[:, 1:3] + boxes[:, 3:] / 2])
        assert corners.min() >= 0 and corners.max() <= 1
        # A person box is warmer, on average, than the infrared image as a whole.
        for box in boxes[boxes[:, 0] == 0]:
            height, width = a.shape[-2:]
            x0, x1 = int((box[1] - box[3] / 2) * width), int((box[1] + box[3] / 2) * width)
            y0, y1 = int((box[2] - box[4] / 2) * height), int((box[2] + box[4] / 2) * height)
            assert a[0, y0:y1, x0:x1].mean() > a.mean(), (dataset.names[index], box)
    fusion = sample_dataset(task="fusion")
    assert fusion[0][2] == "00004N"
    with pytest.raises(ValueError, match="detection boxes only"):
        sample_dataset(task="segmentation")


def test_mask_size_applies_after_the_transform(tmp_path):
    write_pairs(tmp_path / "train", ["a"], size=(40, 60))
    (tmp_path / "train" / "Segmentation_labels").mkdir()
    mask = np.zeros((40, 60), dtype=np.uint8)
    mask[:, 30:] = 5  # right half
    Image.fromarray(mask).save(tmp_path / "train" / "Segmentation_labels" / "a.png")
    flip = RandomHorizontalFlip(1.0)
    a, _, small = MSRSDataset(tmp_path, "train", mask_size=(20, 30), transform=flip)[0]
    assert a.shape == (1, 40, 60) and small.shape == (20, 30)
    assert (small[:, :15] == 5).all() and (small[:, 15:] == 0).all()  # flipped, then resized


def _exif_rotated_jpeg(path, displayed: np.ndarray, orientation: int = 6) -> None:
    """Save ``displayed`` as a phone does: pixels stored turned, with an EXIF orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: viewers turn the stored pixels 90 degrees clockwise
    stored = Image.fromarray(displayed).transpose(Image.Transpose.ROTATE_90)
    stored.save(path, exif=exif, quality=95)


def test_exif_orientation_is_applied_to_luma_and_chroma(tmp_path):
    displayed = np.zeros((32, 48, 3), dtype=np.uint8)
    displayed[:, :24] = (200, 40, 40)  # red on the left as displayed
    displayed[:, 24:] = (30, 30, 160)  # blue on the right
    _exif_rotated_jpeg(tmp_path / "phone.jpg", displayed)
    with Image.open(tmp_path / "phone.jpg") as stored:
        assert stored.size == (32, 48)  # stored turned: 32 wide, 48 high
    image = read_image(tmp_path / "phone.jpg")
    assert image.shape == (32, 48, 3)
    np.testing.assert_allclose(image[:, :20].mean(axis=(0, 1)), (200, 40, 40), atol=12)
    np.testing.assert_allclose(image[:, 28:].mean(axis=(0, 1)), (30, 30, 160), atol=12)
    luma, chroma = read_luma(tmp_path / "phone.jpg")
    assert luma.shape == (32, 48) and chroma.shape == (32, 48, 2)
    assert chroma[:, :20, 0].mean() > 150 > chroma[:, 28:, 0].mean()  # Cr high where red


def test_size_mismatch_reports_the_displayed_sizes(tmp_path):
    from tdfusion.data.io import read_luma_pair

    _exif_rotated_jpeg(tmp_path / "phone.jpg", np.full((32, 48, 3), 90, dtype=np.uint8))
    Image.fromarray(np.zeros((32, 48), dtype=np.uint8)).save(tmp_path / "ir.png")
    assert read_luma_pair(tmp_path / "ir.png", tmp_path / "phone.jpg")[0].shape == (32, 48)
    Image.fromarray(np.zeros((48, 32), dtype=np.uint8)).save(tmp_path / "tall.png")
    with pytest.raises(DataError, match=r"tall\.png is 32x48 but .*phone\.jpg is 48x32"):
        read_luma_pair(tmp_path / "tall.png", tmp_path / "phone.jpg")


def test_exif_orientation_of_an_infrared_image_is_applied(tmp_path):
    displayed = np.zeros((20, 30), dtype=np.uint8)
    displayed[:, :10] = 220
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(displayed).transpose(Image.Transpose.ROTATE_90)
    stored.save(tmp_path / "ir.jpg", exif=exif, quality=100)
    image = read_image(tmp_path / "ir.jpg")
    assert image.shape == (20, 30)
    assert image[:, :8].mean() > 200 > 20 > image[:, 12:].mean()


def test_32_bit_integer_images_are_clipped_not_scaled_and_16_bit_scaled(tmp_path):
    values = np.array([[-7, 0, 100, 255, 70000]], dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "int32.tif")
    with Image.open(tmp_path / "int32.tif") as image:
        assert image.mode == "I"
    assert read_image(tmp_path / "int32.tif").tolist() == [[0.0, 0.0, 100.0, 255.0, 255.0]]
    deep = np.array([[0, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.tif")
    assert read_image(tmp_path / "deep.tif", np.float64).tolist() == [[0.0, 255.0]]


# ------------------------------------------------------- header check before training
def _pair_folders(tmp_path, sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]]):
    """Folders ir/ and vi/ with one JPEG pair per name, of the given (H, W) sizes."""
    for side in ("ir", "vi"):
        (tmp_path / side).mkdir()
    for name, (size_ir, size_vi) in sizes.items():
        ir_image = Image.fromarray(np.full(size_ir, 90, dtype=np.uint8))
        ir_image.save(tmp_path / "ir" / f"{name}.jpg")
        Image.fromarray(np.full((*size_vi, 3), 90, dtype=np.uint8)).save(
            tmp_path / "vi" / f"{name}.jpg"
        )
    return PairedImageDataset(tmp_path / "ir", tmp_path / "vi")


def test_check_files_refuses_a_pair_of_two_sizes_naming_both_files(tmp_path):
    dataset = _pair_folders(tmp_path, {"a": ((20, 30), (20, 30)), "b": ((20, 30), (22, 30))})
    with pytest.raises(DataError) as refused:
        dataset.check_files()
    message = str(refused.value)
    assert message.startswith("1 of 2 image pairs cannot be used: size mismatch")
    ir, vi = tmp_path / "ir" / "b.jpg", tmp_path / "vi" / "b.jpg"
    assert f"{ir} is 30x20 but {vi} is 30x22" in message
    assert "a.jpg" not in message and len(message.splitlines()) == 1


def test_check_files_names_unreadable_headers_and_counts_them(tmp_path):
    dataset = _pair_folders(tmp_path, {name: ((20, 30), (20, 30)) for name in "abcde"})
    for name in "bcde":
        (tmp_path / "vi" / f"{name}.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError) as refused:
        dataset.check_files()
    message = str(refused.value)
    assert message.startswith("4 of 5 image pairs cannot be used: cannot read image")
    assert str(tmp_path / "vi" / "b.jpg") in message and message.endswith("; and 1 more")
    assert len(message.splitlines()) == 1


def test_check_files_reads_headers_only_and_agrees_with_the_reader(tmp_path, monkeypatch):
    dataset = _pair_folders(tmp_path, {"a": ((48, 64), (48, 64)), "b": ((32, 48), (32, 48))})
    # Turned by its EXIF orientation, a stored 32x48 pair's visible image is displayed 48x32.
    _exif_rotated_jpeg(tmp_path / "vi" / "b.jpg", np.full((32, 48, 3), 90, dtype=np.uint8))
    # A truncated JPEG has a sound header: the check passes it, the reader refuses it.
    noise = np.random.default_rng(0).integers(0, 255, (48, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "ir" / "a.jpg")
    whole = (tmp_path / "ir" / "a.jpg").read_bytes()
    (tmp_path / "ir" / "a.jpg").write_bytes(whole[: len(whole) // 2])

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("check_files decoded pixels")

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "load", no_decoding)
        dataset.check_files()
    assert dataset.read_pair(1)[0].shape == (1, 32, 48)
    with pytest.raises(DataError, match=r"cannot read image .*a\.jpg: image file is truncated"):
        dataset.read_pair(0)
