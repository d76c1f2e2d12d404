"""Inputs the task adapters must handle or refuse clearly: void-only masks, end-to-end YOLO
heads, boxes in pixels, images too small for the network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tdfusion.errors import DataError
from tdfusion.tasks import Detections, DetectionScore, DetectionTask, SegmentationTask
from tdfusion.tasks.base import evaluation_mode


@pytest.fixture(scope="module")
def void_segmentation_task() -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask(num_classes=5, ignore_index=255)


@pytest.fixture(scope="module")
def research_segmentation_task() -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask(num_classes=5, ignore_index=255, pad=False, align_corners=True)


@pytest.fixture(scope="module")
def detection_task() -> DetectionTask:
    torch.manual_seed(0)
    return DetectionTask(num_classes=6)


# --- segmentation: batches without a labelled pixel ------------------------------------------


@pytest.mark.parametrize("research", [False, True], ids=["padded", "research"])
def test_segmentation_void_only_batch_gives_zero_loss_and_finite_gradients(
    void_segmentation_task: SegmentationTask,
    research_segmentation_task: SegmentationTask,
    research: bool,
) -> None:
    task = research_segmentation_task if research else void_segmentation_task
    task.zero_grad()
    fused = torch.rand(2, 1, 40, 48, requires_grad=True)
    masks = torch.full((2, 40, 48), 255)
    loss = task(fused, masks)
    assert loss.ndim == 0
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(fused.grad).all()
    gradients = [p.grad for p in task.parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)


def test_segmentation_void_only_batch_does_not_stop_the_trainer(
    void_segmentation_task: SegmentationTask,
) -> None:
    from tdfusion import LossGenerator, MetaFusionTrainer
    from tdfusion.nets import ReFusionNet

    trainer = MetaFusionTrainer(
        ReFusionNet(dim=8, num_blocks=1, num_heads=2),
        void_segmentation_task,
        LossGenerator(dim=8, num_blocks=1, num_heads=2),
        device="cpu",
    )
    batch = (torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32), torch.full((2, 32, 32), 255))
    stats = trainer.fusion_step(batch)
    assert stats["task_loss"] == 0.0


@pytest.mark.parametrize("research", [False, True], ids=["padded", "research"])
def test_segmentation_mixed_mask_loss_is_the_mean_cross_entropy(
    void_segmentation_task: SegmentationTask,
    research_segmentation_task: SegmentationTask,
    research: bool,
) -> None:
    # research: unpadded input, masks at twice its size, logits resized with align_corners
    task = research_segmentation_task if research else void_segmentation_task
    fused = torch.rand(2, 1, 45, 60)
    mask_size = (90, 120) if research else (45, 60)
    masks = torch.randint(0, 5, (2, *mask_size))
    masks[0, :25] = 255
    masks[1, :, 7:] = 255
    with evaluation_mode(task), torch.no_grad():
        loss = task(fused, masks)
        logits = F.interpolate(
            task.logits(fused) if not research else task.network(fused),
            size=mask_size,
            mode="bilinear",
            align_corners=research,
        )
        expected = F.cross_entropy(logits, masks, ignore_index=255)
    # Both reduce the same per-pixel sum, then divide by the same count: exactly equal.
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


# --- detection: heads the YOLOv8 loss cannot train -----------------------------------------


@pytest.mark.parametrize("model", ["yolov10n.yaml", "yolo26n.yaml"])
def test_detection_refuses_end_to_end_heads(model: str) -> None:
    with pytest.raises(ValueError, match=rf"{model}.*end-to-end.*YOLOv8 or YOLO11"):
        DetectionTask(num_classes=2, model=model)


def test_detection_accepts_yolo11() -> None:
    task = DetectionTask(num_classes=2, model="yolo11n.yaml")
    loss = task(torch.rand(2, 1, 64, 64), torch.tensor([[0, 1, 0.5, 0.5, 0.5, 0.5]]))
    assert torch.isfinite(loss)


# --- detection: boxes must be normalised ----------------------------------------------------


def test_detection_rejects_boxes_in_pixels(detection_task: DetectionTask) -> None:
    fused = torch.rand(1, 1, 192, 256)
    pixels = torch.tensor([[0, 1, 128.0, 96.0, 102.4, 96.0]])
    with pytest.raises(DataError, match=r"row 0 .*normalised.*in \[0, 1\]"):
        detection_task(fused, pixels)
    second_row = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.5], [0, 2, 0.5, 0.5, 1.2, 0.1]])
    with pytest.raises(DataError, match=r"row 1 .*normalised"):
        detection_task(fused, second_row)
    with pytest.raises(DataError, match=r"row 0 .*normalised"):
        detection_task(fused, torch.tensor([[0, 1, -0.2, 0.5, 0.1, 0.1]]))


def test_detection_accepts_boxes_at_the_edges_within_the_tolerance(
    detection_task: DetectionTask,
) -> None:
    fused = torch.rand(1, 1, 64, 64)
    edges = torch.tensor([[0, 1, 0.0, 1.0, 1.0005, 0.0], [0, 2, 1.0, -0.0005, 0.5, 1.0]])
    assert torch.isfinite(detection_task(fused, edges))


def test_detection_score_rejects_boxes_in_pixels() -> None:
    found = Detections(
        torch.tensor([[76.8, 48.0, 179.2, 144.0]]), torch.tensor([0.9]), torch.tensor([1])
    )
    score = DetectionScore()
    with pytest.raises(DataError, match=r"row 0 .*normalised.*in \[0, 1\]"):
        score.update([found], torch.tensor([[0, 1, 128.0, 96.0, 102.4, 96.0]]), (192, 256))
    with pytest.raises(DataError, match=r"row 0 .*normalised"):
        score.update([found], torch.tensor([[0, 1, float("nan"), 0.5, 0.4, 0.5]]), (192, 256))
    score.update([found], torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.5]]), (192, 256))
    assert score.compute()["mAP50"] == pytest.approx(0.995)


# --- images too small for the network -------------------------------------------------------


def test_segformer_unpadded_minimum_size_comes_from_the_encoder(
    research_segmentation_task: SegmentationTask,
) -> None:
    # mit_b0: 7x7 stride-4 patch embedding (padding 3), then a kernel-8 reduction: 29 pixels.
    assert research_segmentation_task.min_input_size == (29, 29)
    loss = research_segmentation_task(torch.rand(1, 1, 29, 29), torch.randint(0, 5, (1, 29, 29)))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("size", [(24, 320), (240, 20), (28, 28)])
def test_segformer_unpadded_refuses_small_images(
    research_segmentation_task: SegmentationTask, size: tuple[int, int]
) -> None:
    fused = torch.rand(2, 1, *size)
    message = rf"at least 29 x 29 pixels.*got {size[0]} x {size[1]}.*pad=True"
    with pytest.raises(ValueError, match=message):
        research_segmentation_task(fused, torch.randint(0, 5, (2, *size)))
    with pytest.raises(ValueError, match=message):
        research_segmentation_task.predict(fused)


def test_segformer_padded_accepts_small_images(void_segmentation_task: SegmentationTask) -> None:
    loss = void_segmentation_task(torch.rand(1, 1, 5, 7), torch.randint(0, 5, (1, 5, 7)))
    assert torch.isfinite(loss)


def test_yolo_training_refuses_a_single_value_per_channel(detection_task: DetectionTask) -> None:
    detection_task.train()
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.5, 0.5]])
    with pytest.raises(ValueError, match=r"\(1, 1, 32, 20\).*stride 32.*at least 2 images"):
        detection_task(torch.rand(1, 1, 32, 20), targets)
    # Two images, a 2-cell map or evaluation mode all leave more than one value per channel.
    assert torch.isfinite(detection_task(torch.rand(2, 1, 32, 32), targets))
    assert torch.isfinite(detection_task(torch.rand(1, 1, 32, 33), targets))
    with evaluation_mode(detection_task):
        assert torch.isfinite(detection_task(torch.rand(1, 1, 32, 32), targets))
