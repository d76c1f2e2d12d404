"""Downstream scores accumulated over a test set: mIoU/mAcc for segmentation, mAP for detection."""

from __future__ import annotations

import math
import types
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tdfusion.errors import DataError
from tdfusion.tasks._ultralytics import load_ultralytics
from tdfusion.tasks.detection import check_normalised_boxes

__all__ = ["DetectionScore", "SegmentationScore"]


def _nan_mean(values: torch.Tensor) -> float:
    finite = values[~torch.isnan(values)]
    return float(finite.mean()) if finite.numel() else math.nan


class SegmentationScore:
    """Per-class IoU and accuracy, mIoU and mAcc from a confusion matrix accumulated over batches.

    For class ``c`` with ``TP`` pixels labelled ``c`` and predicted ``c``, ``FN`` labelled ``c``
    and predicted otherwise, ``FP`` predicted ``c`` and labelled otherwise:
    ``IoU_c = TP / (TP + FP + FN)`` and ``Acc_c = TP / (TP + FN)``. A class with no pixel in the
    labels gets ``Acc = nan`` (and ``IoU = nan`` when it is never predicted either, ``0``
    otherwise); means skip ``nan`` (the convention of mmsegmentation). ``aAcc`` is the overall
    pixel accuracy. Pixels labelled ``ignore_index`` are left out.

    Parameters
    ----------
    num_classes : int
        Number of classes (including background/unlabelled when it is a class).
    ignore_index : int or None
        Label value to leave out (e.g. 255).

    Shape
    -----
    - prediction: ``(N, H, W)`` integer label maps, or ``(N, num_classes, H, W)`` class scores
      (arg-maxed).
    - target: ``(N, H, W)`` integer labels.

    Example
    -------
    >>> score = SegmentationScore(num_classes=3)
    >>> score.update(torch.tensor([[[0, 1, 1, 1, 2, 0]]]), torch.tensor([[[0, 0, 1, 1, 2, 2]]]))
    >>> round(score.compute()["mIoU"], 4)
    0.5
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.confusion_matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.confusion_matrix = torch.zeros_like(self.confusion_matrix)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch to the confusion matrix (rows: labels, columns: predictions).

        Parameters
        ----------
        prediction : torch.Tensor
            ``(N, H, W)`` label maps or ``(N, num_classes, H, W)`` class scores.
        target : torch.Tensor
            ``(N, H, W)`` labels, same ``N, H, W`` as ``prediction``.
        """
        if prediction.ndim == 4 and prediction.shape[1] == self.num_classes:
            prediction = prediction.argmax(dim=1)
        if prediction.shape != target.shape or target.ndim != 3:
            raise ValueError(
                f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must both "
                f"be (N, H, W) label maps of the same size (or prediction (N, {self.num_classes}, "
                "H, W) scores); resize the prediction to the label size first"
            )
        if prediction.is_floating_point() or target.is_floating_point():
            raise ValueError(
                f"label maps must be integer tensors, got {prediction.dtype} and {target.dtype}"
            )
        prediction = prediction.detach().long().flatten()
        target = target.detach().to(prediction.device).long().flatten()
        if self.ignore_index is not None:
            kept = target != self.ignore_index
            prediction, target = prediction[kept], target[kept]
        self._check_range(target, "target")
        self._check_range(prediction, "prediction")
        counts = torch.bincount(
            target * self.num_classes + prediction, minlength=self.num_classes**2
        )
        self.confusion_matrix += counts.reshape(self.num_classes, self.num_classes).cpu()

    def compute(self) -> dict[str, Any]:
        """The scores of everything accumulated.

        Returns
        -------
        dict
            ``"mIoU"``, ``"mAcc"``, ``"aAcc"`` (floats in [0, 1]) and ``"IoU"``, ``"Acc"`` (lists of
            ``num_classes`` floats, ``nan`` where undefined).
        """
        matrix = self.confusion_matrix.double()
        true_positive = matrix.diagonal()
        labelled = matrix.sum(dim=1)
        predicted = matrix.sum(dim=0)
        union = labelled + predicted - true_positive
        nan = torch.full_like(true_positive, math.nan)
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), nan)
        accuracy = torch.where(labelled > 0, true_positive / labelled.clamp(min=1), nan)
        total = matrix.sum()
        return {
            "mIoU": _nan_mean(iou),
            "mAcc": _nan_mean(accuracy),
            "aAcc": float(true_positive.sum() / total) if total > 0 else math.nan,
            "IoU": iou.tolist(),
            "Acc": accuracy.tolist(),
        }

    def _check_range(self, labels: torch.Tensor, name: str) -> None:
        outside = (labels < 0) | (labels >= self.num_classes)
        if bool(outside.any()):
            bad = torch.unique(labels[outside])[:5].tolist()
            hint = " (set ignore_index for void labels)" if name == "target" else ""
            raise DataError(f"{name} holds labels {bad} outside 0..{self.num_classes - 1}{hint}")


class DetectionScore:
    """mAP50, mAP75, mAP50-95 and per-class AP, computed as ultralytics' validator does.

    Predictions are matched to ground-truth boxes of the same class per image at the ten IoU
    thresholds 0.50:0.05:0.95 with ultralytics' validator matching, and AP is ultralytics'
    ``ap_per_class`` (101-point interpolated precision-recall area). As in ultralytics, means are
    taken over the classes that appear in the ground truth, and the largest attainable AP is
    0.995, not 1 (the interpolation's last point, at recall 1, has precision 0).

    Requires the ``det`` extra (ultralytics).

    Shape
    -----
    - detections: a sequence of ``N`` :class:`~tdfusion.tasks.detection.Detections` (or any
      objects with ``boxes (K, 4)`` xyxy pixels, ``scores (K,)``, ``classes (K,)``).
    - targets: ``(M, 6)`` rows ``[batch_index, class, x_center, y_center, width, height]``,
      normalised by ``image_size``.

    Example
    -------
    >>> from tdfusion.tasks.detection import Detections
    >>> score = DetectionScore()
    >>> box = torch.tensor([[10.0, 10, 50, 50]])
    >>> found = Detections(box, scores=torch.tensor([0.9]), classes=torch.tensor([0]))
    >>> score.update([found], torch.tensor([[0, 0, 0.3, 0.3, 0.4, 0.4]]), image_size=(100, 100))
    >>> round(score.compute()["mAP50"], 3)
    0.995
    """

    #: IoU thresholds 0.50, 0.55, ..., 0.95 (index 0 is mAP50, index 5 is mAP75).
    IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)

    def __init__(self) -> None:
        self._correct: list[np.ndarray] = []
        self._confidences: list[np.ndarray] = []
        self._predicted_classes: list[np.ndarray] = []
        self._target_classes: list[np.ndarray] = []

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self.__init__()

    def update(
        self,
        detections: Sequence[Any],
        targets: torch.Tensor,
        image_size: tuple[int, int],
    ) -> None:
        """Add the detections and ground truth of one batch.

        Parameters
        ----------
        detections : sequence of Detections
            One per image of the batch, boxes in pixels of an image of ``image_size``.
        targets : torch.Tensor
            ``(M, 6)`` normalised ground truth of the batch; row ``[i, ...]`` belongs to
            ``detections[i]``. A box value outside [0, 1] (e.g. a box in pixels) raises
            :class:`~tdfusion.errors.DataError`.
        image_size : tuple of int
            ``(height, width)`` of the images the detections were made on.
        """
        if not isinstance(targets, torch.Tensor) or targets.ndim != 2 or targets.shape[1] != 6:
            shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets)
            raise ValueError(
                "targets must be a tensor (M, 6) of [batch_index, class, x_center, y_center, "
                f"width, height], got {shape}"
            )
        targets = targets.detach().cpu().double()
        if targets.shape[0] and (
            (targets[:, 0] < 0).any() or (targets[:, 0] >= len(detections)).any()
        ):
            raise DataError(
                f"targets name images {sorted(set(targets[:, 0].long().tolist()))} but "
                f"{len(detections)} detection lists were given"
            )
        check_normalised_boxes(targets)
        height, width = image_size
        scale = targets.new_tensor([width, height, width, height])
        for index, found in enumerate(detections):
            rows = targets[targets[:, 0] == index]
            centre_size = rows[:, 2:6] * scale
            true_boxes = torch.cat(
                (
                    centre_size[:, :2] - centre_size[:, 2:] / 2,
                    centre_size[:, :2] + centre_size[:, 2:] / 2,
                ),
                dim=1,
            )
            self._add_image(found, true_boxes, rows[:, 1].long())

    def _add_image(self, found: Any, true_boxes: torch.Tensor, true_classes: torch.Tensor) -> None:
        boxes = torch.as_tensor(found.boxes).detach().cpu().double().reshape(-1, 4)
        scores = torch.as_tensor(found.scores).detach().cpu().double().reshape(-1)
        classes = torch.as_tensor(found.classes).detach().cpu().long().reshape(-1)
        if not boxes.shape[0] == scores.shape[0] == classes.shape[0]:
            raise ValueError(
                f"detections hold {boxes.shape[0]} boxes, {scores.shape[0]} scores and "
                f"{classes.shape[0]} classes; expected one of each per detection"
            )
        order = torch.argsort(scores, descending=True, stable=True)  # matching needs this order
        boxes, scores, classes = boxes[order], scores[order], classes[order]
        thresholds = self.IOU_THRESHOLDS
        if boxes.shape[0] and true_boxes.shape[0]:
            ultralytics = load_ultralytics()
            iou = ultralytics.box_iou(true_boxes, boxes)
            matcher = types.SimpleNamespace(iouv=thresholds)
            correct = ultralytics.match_predictions(matcher, classes, true_classes, iou).numpy()
        else:
            correct = np.zeros((boxes.shape[0], thresholds.numel()), dtype=bool)
        self._correct.append(correct)
        self._confidences.append(scores.numpy())
        self._predicted_classes.append(classes.numpy())
        self._target_classes.append(true_classes.numpy())

    def compute(self) -> dict[str, Any]:
        """The scores of everything accumulated.

        Returns
        -------
        dict
            ``"mAP50"``, ``"mAP75"``, ``"mAP50-95"`` (floats; 0 when there is no ground truth)
            and ``"per_class"``: class index -> ``{"AP50", "AP75", "AP50-95"}`` for every class
            in the ground truth.
        """
        target_classes = (
            np.concatenate(self._target_classes) if self._target_classes else np.zeros(0)
        )
        if target_classes.size == 0:
            return {"mAP50": 0.0, "mAP75": 0.0, "mAP50-95": 0.0, "per_class": {}}
        results = load_ultralytics().ap_per_class(
            np.concatenate(self._correct),
            np.concatenate(self._confidences),
            np.concatenate(self._predicted_classes),
            target_classes,
            plot=False,
        )
        average_precision, classes = results[5], results[6]
        per_class = {
            int(c): {
                "AP50": float(ap[0]),
                "AP75": float(ap[5]),
                "AP50-95": float(ap.mean()),
            }
            for c, ap in zip(classes, average_precision)
        }
        return {
            "mAP50": float(average_precision[:, 0].mean()),
            "mAP75": float(average_precision[:, 5].mean()),
            "mAP50-95": float(average_precision.mean()),
            "per_class": per_class,
        }
