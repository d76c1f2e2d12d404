"""Object detection as the task network: ultralytics' YOLOv8 with its training loss."""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from tdfusion.errors import DataError
from tdfusion.tasks._model_yaml import load_model_config, model_activation
from tdfusion.tasks._ultralytics import load_ultralytics, quiet_ultralytics_logger
from tdfusion.tasks.base import check_fused_image, evaluation_mode, pad_to_multiple

__all__ = ["DetectionTask", "Detections"]

#: Fill value of the padding, ultralytics' letterbox grey (114 on a 0..255 scale).
PAD_VALUE = 114.0 / 255.0


class Detections(NamedTuple):
    """Detections of one image after non-maximum suppression.

    Attributes
    ----------
    boxes : torch.Tensor
        ``(K, 4)`` boxes ``x1, y1, x2, y2`` in pixels of the input image.
    scores : torch.Tensor
        ``(K,)`` confidences, in descending order.
    classes : torch.Tensor
        ``(K,)`` int64 class indices.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # ultralytics' loss allocates its accumulators with the default dtype; without this a
    # float64 model would get a float32 loss (or an index_put dtype error).
    previous = torch.get_default_dtype()
    if dtype == previous or dtype not in (torch.float32, torch.float64):
        yield
        return
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class DetectionTask(nn.Module):
    """YOLOv8 trained from scratch with the YOLOv8 loss (the paper's detection T).

    ``ultralytics.nn.tasks.DetectionModel`` is built from its yaml (no weights) and trained with
    ``ultralytics.utils.loss.v8DetectionLoss`` (task-aligned assignment, CIoU box loss, BCE class
    loss, distribution focal loss) with the gains ``box``, ``cls`` and ``dfl``. ultralytics returns
    that loss multiplied by the batch size; :meth:`forward` returns the per-image figure
    ``box_gain * L_box + cls_gain * L_cls + dfl_gain * L_dfl`` (the ultralytics loss divided by
    the batch size), so it does not grow with the batch.

    H and W need not be multiples of 32: the input is padded at the bottom/right with
    ultralytics' letterbox grey and the normalised targets are rescaled to the padded frame.

    Parameters
    ----------
    num_classes : int
        Number of object classes (M3FD 6, LLVIP 1).
    model : str, pathlib.Path or dict
        ultralytics model yaml: a bundled name such as ``"yolov8n.yaml"`` (the scale letter
        selects the width/depth), a local ``.yaml`` path, or the parsed dict. It is read as
        plain data and nothing in it runs: layer modules must be ultralytics' or ``torch.nn``
        layers, arguments plain values, and ``activation`` a ``torch.nn`` activation such as
        ``nn.SiLU()`` or ``nn.LeakyReLU(0.1)`` (else :class:`~tdfusion.errors.DataError`).
        Its detect head must be a one-to-many head trained with NMS (YOLOv8, YOLO11): the
        end-to-end heads of YOLOv10 and YOLO26 raise ``ValueError``.
    in_channels : int
        Channels of the fused image (1 for the Y channel).
    box_gain, cls_gain, dfl_gain : float
        Loss gains (ultralytics' defaults 7.5, 0.5, 1.5, as in the paper).

    Shape
    -----
    - fused: ``(N, in_channels, H, W)``, floating point (values in [0, 1]).
    - targets: ``(M, 6)`` rows ``[batch_index, class, x_center, y_center, width, height]`` with
      the box normalised to [0, 1] by the image width/height (values outside [0, 1], such as
      boxes in pixels, raise :class:`~tdfusion.errors.DataError`); ``M`` may be 0.
    - output of ``forward``: scalar; of ``predict``: a list of ``N`` :class:`Detections`.

    Notes
    -----
    - In training mode the batch normalisation needs more than one value per channel at the
      coarsest scale (the model's largest stride, 32 for YOLOv8): a batch of one image no larger
      than 32 x 32 raises ``ValueError``; use two images or more, or evaluation mode.
    - The loss works in training mode (the detect head returns its raw outputs) and in evaluation
      mode (the raw outputs are taken from the second element the head returns); batch
      normalisation follows the module's mode as usual.
    - The gradient is not the exact derivative of the loss value: the label assignment (target
      boxes and scores) is computed from detached predictions, as in ultralytics. Finite
      differences of the loss therefore do not match its gradient; use another task for such
      checks.
    - float64 works (the module and the input both in float64); the loss is then float64.
    - The model's ``DFL`` convolution is a frozen parameter (``requires_grad=False``) and unused in
      training mode: take the trainable parameters as those with ``requires_grad``.
    - Requires the ``det`` extra (ultralytics, AGPL-3.0), imported on first use.

    Example
    -------
    >>> task = DetectionTask(num_classes=6)
    >>> fused = torch.rand(2, 1, 192, 256, requires_grad=True)
    >>> targets = torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.3], [1, 4, 0.3, 0.6, 0.1, 0.2]])
    >>> task(fused, targets).backward()
    >>> [d.boxes.shape[1] for d in task.predict(fused)]
    [4, 4]
    """

    def __init__(
        self,
        num_classes: int,
        model: str | Path | dict = "yolov8n.yaml",
        in_channels: int = 1,
        *,
        box_gain: float = 7.5,
        cls_gain: float = 0.5,
        dfl_gain: float = 1.5,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}")
        ultralytics = load_ultralytics()
        config = load_model_config(model, ultralytics)
        where = f"model yaml {config.get('yaml_file', model if isinstance(model, str) else 'dict')}"
        with (
            quiet_ultralytics_logger(),
            model_activation(config, ultralytics.Conv, where) as buildable,
        ):
            self.model = ultralytics.DetectionModel(
                buildable, ch=in_channels, nc=num_classes, verbose=False
            )
        if getattr(self.model.model[-1], "one2one_cv2", None) is not None:
            # ultralytics trains such heads with its E2ELoss, whose outputs v8DetectionLoss
            # cannot read (it fails with a bare KeyError 'boxes').
            name = Path(config["yaml_file"]).name if "yaml_file" in config else "the given dict"
            raise ValueError(
                f"model {name} has an end-to-end (NMS-free, one-to-one) detect head, as YOLOv10 "
                "and YOLO26 do, which DetectionTask cannot train; use a YOLOv8 or YOLO11 yaml "
                "such as 'yolov8n.yaml' or 'yolo11n.yaml'"
            )
        # v8DetectionLoss reads its gains from ``model.args`` (ultralytics' hyper-parameters).
        self.model.args = types.SimpleNamespace(box=box_gain, cls=cls_gain, dfl=dfl_gain)
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.stride = int(self.model.stride.max())

    def _criterion(self) -> Any:
        # Built per call: it captures the device and the detect head's stride tensor, which
        # ``.to()`` replaces. It holds no parameters, so substituted parameters are used as given.
        return load_ultralytics().v8DetectionLoss(self.model)

    def loss_components(self, fused: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The gain-weighted box, class and DFL losses per image.

        Parameters
        ----------
        fused : torch.Tensor
            Shape ``(N, in_channels, H, W)``.
        targets : torch.Tensor
            Shape ``(M, 6)``, see the class docstring.

        Returns
        -------
        torch.Tensor
            Shape ``(3,)``: ``box_gain * L_box``, ``cls_gain * L_cls``, ``dfl_gain * L_dfl``.
        """
        check_fused_image(fused, self.in_channels)
        targets = self._check_targets(fused, targets)
        self._check_batch_norm_input(fused)
        batch_size, _, height, width = fused.shape
        padded = pad_to_multiple(fused, self.stride, mode="constant", value=PAD_VALUE)
        padded_height, padded_width = padded.shape[-2:]
        # Boxes are normalised to the unpadded image; ultralytics scales them by the padded size.
        to_padded = targets.new_tensor([width / padded_width, height / padded_height]).repeat(2)
        # ultralytics' target padding assumes the rows are grouped by image
        targets = targets[torch.argsort(targets[:, 0], stable=True)]
        batch = {
            "batch_idx": targets[:, 0],
            "cls": targets[:, 1],
            "bboxes": targets[:, 2:6] * to_padded,
        }
        outputs = self.model(padded)
        raw_outputs = outputs[1] if isinstance(outputs, tuple) else outputs  # eval: (decoded, raw)
        with _default_dtype(fused.dtype):
            scaled_loss, _ = self._criterion()(raw_outputs, batch)
        return scaled_loss / batch_size

    def forward(self, fused: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """YOLOv8 loss per image.

        Parameters
        ----------
        fused : torch.Tensor
            Shape ``(N, in_channels, H, W)``.
        targets : torch.Tensor
            Shape ``(M, 6)``, see the class docstring.

        Returns
        -------
        torch.Tensor
            Scalar: the sum of :meth:`loss_components`.
        """
        return self.loss_components(fused, targets).sum()

    def predict(
        self,
        fused: torch.Tensor,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
    ) -> list[Detections]:
        """Detections after class-aware non-maximum suppression, in evaluation mode.

        Parameters
        ----------
        fused : torch.Tensor
            Shape ``(N, in_channels, H, W)``.
        conf : float
            Confidence threshold (use 0.001 for mAP evaluation, as ultralytics' validator does).
        iou : float
            IoU threshold of the suppression.
        max_det : int
            Most detections kept per image.

        Returns
        -------
        list of Detections
            One per image, boxes clipped to the image.
        """
        check_fused_image(fused, self.in_channels)
        height, width = fused.shape[-2:]
        padded = pad_to_multiple(fused, self.stride, mode="constant", value=PAD_VALUE)
        with evaluation_mode(self), torch.no_grad():
            decoded, _ = self.model(padded)
            kept = load_ultralytics().non_max_suppression(
                decoded, conf, iou, max_det=max_det, max_time_img=math.inf
            )
        detections = []
        for rows in kept:
            boxes = rows[:, :4].clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            detections.append(Detections(boxes, rows[:, 4].clone(), rows[:, 5].long()))
        return detections

    def _check_batch_norm_input(self, fused: torch.Tensor) -> None:
        # The coarsest feature map is the padded input divided by the largest stride (the detect
        # head's; SPPF runs there in YOLOv8/YOLO11). A batch normalisation in training mode needs
        # more than one value per channel, i.e. more than one image or a map larger than 1 x 1.
        batch_size, _, height, width = fused.shape
        cells = math.ceil(height / self.stride) * math.ceil(width / self.stride)
        if batch_size * cells > 1 or not any(
            isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
            for module in self.model.modules()
        ):
            return
        raise ValueError(
            f"fused of shape {tuple(fused.shape)} leaves a single value per channel at stride "
            f"{self.stride}, which batch normalisation cannot train on; in training mode use at "
            f"least 2 images or images larger than {self.stride} pixels on one side "
            "(or evaluation mode)"
        )

    def _check_targets(self, fused: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(targets, torch.Tensor) or targets.ndim != 2 or targets.shape[1] != 6:
            shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets)
            raise ValueError(
                "targets must be a tensor (M, 6) of [batch_index, class, x_center, y_center, "
                f"width, height], got {shape}"
            )
        targets = targets.to(device=fused.device, dtype=fused.dtype)
        if targets.shape[0]:
            batch_index, classes = targets[:, 0], targets[:, 1]
            bad_rows = (
                (batch_index < 0)
                | (batch_index >= fused.shape[0])
                | (batch_index != batch_index.round())
                | (classes < 0)
                | (classes >= self.num_classes)
                | (classes != classes.round())
                | ~torch.isfinite(targets[:, 2:]).all(dim=1)
                | (targets[:, 4:6] < 0).any(dim=1)
            )
            if bool(bad_rows.any()):
                row = int(bad_rows.nonzero()[0, 0])
                raise DataError(
                    f"detection target row {row} is {targets[row].tolist()}; expected an image "
                    f"index in 0..{fused.shape[0] - 1}, a class in 0..{self.num_classes - 1} and "
                    "a finite box with non-negative width and height"
                )
            check_normalised_boxes(targets)
        return targets


#: How far outside [0, 1] a normalised box value may lie (rounding of converted labels).
BOX_TOLERANCE = 1e-3


def check_normalised_boxes(targets: torch.Tensor, tolerance: float = BOX_TOLERANCE) -> None:
    """Check that the boxes of detection targets are normalised ``xywh`` in [0, 1].

    Boxes in pixels would otherwise pass unnoticed: ultralytics and the scores treat them as
    boxes far outside the image, so the images look empty (the loss is that of an image without
    objects, the mAP 0).

    Parameters
    ----------
    targets : torch.Tensor
        ``(M, 6)`` rows ``[batch_index, class, x_center, y_center, width, height]``.
    tolerance : float
        How far below 0 or above 1 a value may lie.

    Raises
    ------
    DataError
        Naming the first row with a centre or size outside ``[-tolerance, 1 + tolerance]`` or
        not finite.

    Example
    -------
    >>> check_normalised_boxes(torch.tensor([[0, 1, 0.5, 0.5, 0.2, 0.3]]))
    """
    boxes = targets[:, 2:6]
    bad_rows = (~torch.isfinite(boxes) | (boxes < -tolerance) | (boxes > 1 + tolerance)).any(dim=1)
    if bool(bad_rows.any()):
        row = int(bad_rows.nonzero()[0, 0])
        raise DataError(
            f"detection target row {row} is {targets[row].tolist()}; boxes must be normalised "
            "[x_center, y_center, width, height] in [0, 1] (divided by the image width and "
            "height), not in pixels"
        )
