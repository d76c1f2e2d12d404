"""Paired transforms, the source-swap augmentation and the collate functions."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from tdfusion.data import (
    Compose,
    RandomBlur,
    RandomCrop,
    RandomExposure,
    RandomFlip,
    RandomHorizontalFlip,
    RandomNoise,
    RandomVerticalFlip,
    Resize,
    SwapSources,
    detection_collate,
    segmentation_collate,
    swap_sources,
)


def box_sample(size=(40, 60)):
    """Images with one bright rectangle (rows 10-19, columns 30-49) and its box."""
    height, width = size
    image = torch.zeros(1, height, width)
    image[:, 10:20, 30:50] = 1.0
    box = torch.tensor([[1.0, 40 / width, 15 / height, 20 / width, 10 / height]])
    return image, image.clone(), box


def box_region(image, box):
    """The pixels a normalised ``[class, xc, yc, w, h]`` box covers."""
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
        Resize((50, 40)),
        RandomCrop((30, 45), generator=torch.Generator().manual_seed(1)),
        Compose(
            [RandomHorizontalFlip(1.0), RandomCrop(32, generator=torch.Generator().manual_seed(2))]
        ),
        Compose([RandomVerticalFlip(1.0), Resize((33, 47)), RandomHorizontalFlip(1.0)]),
    ],
    ids=["hflip", "vflip", "shrink", "stretch", "crop", "hflip+crop", "vflip+resize+hflip"],
)
def test_boxes_follow_geometric_transforms(transform):
    a, b, boxes = transform(box_sample())
    assert torch.equal(a, b)
    assert len(boxes) == 1 and boxes[0, 0] == 1.0
    inside = box_region(a, boxes[0])
    assert inside.numel() > 0 and inside.mean() > 0.85  # the box still sits on the rectangle
    assert inside.sum() >= 0.8 * a.sum()  # and covers (nearly) all of it


@pytest.mark.parametrize(
    ("transform", "expected"),
    [
        (RandomHorizontalFlip(1.0), [1.0, 1 - 40 / 60, 15 / 40, 20 / 60, 10 / 40]),
        (RandomVerticalFlip(1.0), [1.0, 40 / 60, 1 - 15 / 40, 20 / 60, 10 / 40]),
        (Resize((80, 30)), [1.0, 40 / 60, 15 / 40, 20 / 60, 10 / 40]),
    ],
)
def test_flip_and_resize_box_coordinates(transform, expected):
    _, _, boxes = transform(box_sample())
    torch.testing.assert_close(boxes[0], torch.tensor(expected))


def test_crop_clips_partly_visible_boxes_exactly():
    # Full-height 40x40 windows of the 40x60 image: the rectangle (columns 30-49) is cut by the
    # right edge of the window whenever its left offset is below 10.
    image, _, boxes = box_sample()
    crop = RandomCrop((40, 40), min_visible=0.2, generator=torch.Generator().manual_seed(0))
    seen_clipped = False
    for _ in range(40):
        a, _, cropped = crop((image, image, boxes))
        left = next(x for x in range(21) if torch.equal(a, image[..., x : x + 40]))
        x0, x1 = 30 - left, min(50, left + 40) - left
        seen_clipped |= x1 - x0 < 20
        if (x1 - x0) / 20 < 0.2:
            assert len(cropped) == 0
            continue
        expected = torch.tensor([1.0, (x0 + x1) / 2 / 40, 15 / 40, (x1 - x0) / 40, 10 / 40])
        torch.testing.assert_close(cropped[0], expected)
    assert seen_clipped


def test_crop_drops_boxes_that_leave_or_become_tiny():
    image, _, boxes = box_sample()
    crop = RandomCrop((10, 25), generator=torch.Generator().manual_seed(0))
    for _ in range(30):
        a, _, cropped = crop((image, image, boxes))
        if a.sum() == 0:  # the rectangle left the window
            assert len(cropped) == 0
        for box in cropped:
            assert box[3] * 25 >= 2 and box[4] * 10 >= 2
            assert (box[1:3] - box[3:5] / 2 >= -1e-6).all()
            assert (box[1:3] + box[3:5] / 2 <= 1 + 1e-6).all()


def test_crop_too_large_is_an_error():
    with pytest.raises(ValueError, match="RandomCrop 50x50 is larger than the image 40x60"):
        RandomCrop(50)(box_sample())


def test_masks_follow_crop_flip_and_resize():
    image, _, _ = box_sample()
    mask = (image[0] > 0).long() * 3
    for transform in (
        RandomCrop((20, 30), generator=torch.Generator().manual_seed(3)),
        RandomHorizontalFlip(1.0),
        RandomVerticalFlip(1.0),
        Resize((20, 30)),
    ):
        a, _, moved = transform((image, image, mask))
        assert moved.dtype == torch.int64 and moved.shape == a.shape[-2:]
        assert set(moved.unique().tolist()) <= {0, 3}  # nearest: no blended class values
        torch.testing.assert_close((moved > 0).float(), (a[0] > 0.5).float())


def test_generator_makes_random_transforms_reproducible():
    sample = box_sample()

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        transform = Compose(
            [
                RandomCrop((24, 24), generator=generator),
                RandomHorizontalFlip(generator=generator),
                RandomVerticalFlip(generator=generator),
            ]
        )
        return [transform(sample) for _ in range(5)]

    first, again, other = run(7), run(7), run(8)
    for x, y in zip(first, again, strict=True):
        assert torch.equal(x[0], y[0]) and torch.equal(x[2], y[2])
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(first, other, strict=True))


def test_transforms_pass_file_stems_through():
    a, _, name = Compose([RandomCrop(16), RandomHorizontalFlip(1.0), Resize(8)])(
        (torch.rand(1, 20, 20), torch.rand(1, 20, 20), "00004N")
    )
    assert name == "00004N" and a.shape == (1, 8, 8)


def test_detection_collate_indexes_boxes_by_image():
    samples = [box_sample(), (torch.zeros(1, 40, 60), torch.zeros(1, 40, 60), torch.zeros(0, 5))]
    samples.append(box_sample())
    a, b, targets = detection_collate(samples)
    assert a.shape == b.shape == (3, 1, 40, 60)
    assert targets.shape == (2, 6) and targets[:, 0].tolist() == [0.0, 2.0]
    torch.testing.assert_close(targets[:, 1:], torch.cat([samples[0][2], samples[2][2]]))
    empty = detection_collate([samples[1]])[2]
    assert empty.shape == (0, 6)


def test_segmentation_collate_stacks_masks():
    sample = (torch.zeros(1, 4, 5), torch.ones(1, 4, 5), torch.full((4, 5), 2))
    a, b, masks = segmentation_collate([sample, sample])
    assert a.shape == (2, 1, 4, 5) and masks.shape == (2, 4, 5) and masks.dtype == torch.int64


def test_swap_sources_doubles_the_batch_in_both_orders():
    first, second = box_sample(), box_sample()
    second = (second[0] * 0.5, second[1] * 0.25, second[2])
    a, b, targets = detection_collate([first, second])
    swapped_a, swapped_b, doubled = swap_sources((a, b, targets))
    assert swapped_a.shape == (4, 1, 40, 60)
    assert torch.equal(swapped_a[:2], a) and torch.equal(swapped_a[2:], b)
    assert torch.equal(swapped_b[:2], b) and torch.equal(swapped_b[2:], a)
    assert doubled[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    torch.testing.assert_close(doubled[2:, 1:], targets[:, 1:])
    assert targets[:, 0].tolist() == [0.0, 1.0]  # the input is not modified

    masks = torch.arange(2).view(2, 1, 1).expand(2, 4, 4)
    doubled_masks = swap_sources((a, b, masks))[2]
    assert doubled_masks.shape == (4, 4, 4) and doubled_masks[:, 0, 0].tolist() == [0, 1, 0, 1]
    assert swap_sources((a, b, ["x", "y"]))[2] == ["x", "y", "x", "y"]
    assert swap_sources((a, b, torch.zeros(0, 6)))[2].shape == (0, 6)
    with pytest.raises(ValueError, match="cannot duplicate the target"):
        swap_sources((a, b, 3))


def test_swap_sources_as_a_collate_step():
    samples = [box_sample(), box_sample()]
    loader = DataLoader(samples, batch_size=2, collate_fn=SwapSources(detection_collate))
    a, b, targets = next(iter(loader))
    assert a.shape == (4, 1, 40, 60) and targets.shape == (4, 6)
    assert targets[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    names = DataLoader(
        [
            (torch.zeros(1, 2, 2), torch.ones(1, 2, 2), "p"),
            (torch.zeros(1, 2, 2), torch.ones(1, 2, 2), "q"),
        ],
        batch_size=2,
        collate_fn=SwapSources(),
    )
    a, b, stems = next(iter(names))
    assert list(stems) == ["p", "q", "p", "q"] and a[2:].eq(1).all() and b[2:].eq(0).all()


def test_random_flip_names_its_axis():
    with pytest.raises(ValueError, match="axis must be 'horizontal' or 'vertical'"):
        RandomFlip("diagonal")


def textured_pair(seed=0, size=48):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, size, size, generator=g), torch.rand(1, size, size, generator=g), "stem"


def test_exposure_darkens_each_source_within_its_range():
    a, b, target = textured_pair()
    a2, b2, target2 = RandomExposure(0.5, 0.5, p=1.0, max_gamma=1.0)((a, b, target))
    assert torch.allclose(a2, 0.5 * a) and torch.allclose(b2, 0.5 * b) and target2 == "stem"
    # A gamma of at most 3 and a factor of at most 1: never brighter, never below k * x**3.
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        a3, _, _ = RandomExposure(0.25, 1.0, p=1.0, max_gamma=3.0, generator=g)((a, b, target))
        assert bool((a3 <= a + 1e-7).all()) and bool((a3 >= 0.25 * a**3 - 1e-7).all())
    assert RandomExposure(p=0.0)((a, b, target))[0] is a


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RandomExposure(0.0, 1.0), "0 < low <= high <= 1"),
        (lambda: RandomExposure(0.5, 1.0, max_gamma=0.5), "max_gamma >= 1"),
        (lambda: RandomExposure(0.5, 1.0, p=1.5), "0 <= p <= 1"),
        (lambda: RandomBlur(0.0), "max_sigma > 0"),
        (lambda: RandomBlur(1.0, min_sigma=2.0), "min_sigma <= max_sigma"),
        (lambda: RandomBlur(1.0, source="ir"), "source 'a' or 'b'"),
        (lambda: RandomNoise(-0.1), "max_sigma > 0"),
        (lambda: RandomNoise(0.1, source="c"), "source 'a' or 'b'"),
    ],
)
def test_photometric_transforms_reject_bad_settings(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("source", ["a", "b"])
def test_blur_softens_only_the_chosen_source(source):
    a, b, target = textured_pair()
    a2, b2, target2 = RandomBlur(2.0, min_sigma=2.0, p=1.0, source=source)((a, b, target))
    blurred, kept = (a2, b2) if source == "a" else (b2, a2)
    original, other = (a, b) if source == "a" else (b, a)
    assert torch.equal(kept, other) and target2 == "stem"
    assert blurred.shape == original.shape and blurred.dtype == original.dtype
    # White noise loses most of its variance under a sigma-2 Gaussian; the mean stays.
    assert float(blurred.std()) < 0.3 * float(original.std())
    assert abs(float(blurred.mean()) - float(original.mean())) < 1e-3
    assert RandomBlur(2.0, p=0.0)((a, b, target))[0] is a


def test_blur_keeps_channels_apart():
    image = torch.zeros(3, 9, 9)
    image[1, 4, 4] = 1.0
    blurred, _, _ = RandomBlur(1.0, min_sigma=1.0, p=1.0)((image, image.clone(), None))
    assert float(blurred[0].abs().max()) == 0.0 and float(blurred[2].abs().max()) == 0.0
    assert abs(float(blurred[1].sum()) - 1.0) < 1e-5


@pytest.mark.parametrize("source", ["a", "b"])
def test_noise_is_added_to_the_chosen_source_and_clipped(source):
    a, b = torch.full((1, 64, 64), 0.5), torch.full((1, 64, 64), 0.98)
    g = torch.Generator().manual_seed(3)
    a2, b2, _ = RandomNoise(0.05, p=1.0, source=source, generator=g)((a, b, None))
    noisy, kept, other = (a2, b2, b) if source == "a" else (b2, a2, a)
    assert torch.equal(kept, other)
    assert float(noisy.min()) >= 0.0 and float(noisy.max()) <= 1.0
    assert 0.0 < float((noisy - (a if source == "a" else b)).std()) <= 0.05 + 0.005
    assert RandomNoise(0.05, p=0.0)((a, b, None))[1] is b


def test_noise_and_blur_repeat_with_the_same_seed():
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        blur, noise = RandomBlur(2.0, p=1.0, generator=g), RandomNoise(0.1, p=1.0, generator=g)
        pipeline = Compose([blur, noise])
        return pipeline(textured_pair())

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
