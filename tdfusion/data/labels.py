"""Reading task labels: YOLO box files, VOC xml annotations and segmentation masks."""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tdfusion.errors import DataError

__all__ = ["read_mask", "read_voc_boxes", "read_yolo_boxes"]


def read_yolo_boxes(path: str | os.PathLike[str], num_classes: int | None = None) -> torch.Tensor:
    """Read a YOLO label file: one ``class x_center y_center width height`` line per box.

    Coordinates are normalised to [0, 1]; blank lines are ignored; a missing file means no
    object.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.txt`` file.
    num_classes : int, optional
        When given, class indices must be below it.

    Returns
    -------
    torch.Tensor
        float32 (M, 5): ``[class, x_center, y_center, width, height]``.

    Raises
    ------
    DataError
        For a bad line, naming the file and line number and saying what was expected.

    Example
    -------
    >>> from pathlib import Path
    >>> _ = Path("boxes.txt").write_text("2 0.5 0.5 0.25 0.1\\n")
    >>> read_yolo_boxes("boxes.txt", num_classes=3).tolist()
    [[2.0, 0.5, 0.5, 0.25, 0.10000000149011612]]
    """
    path = Path(path)
    if not path.is_file():
        return torch.zeros((0, 5), dtype=torch.float32)
    rows = []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read label file {path}: {error}") from None
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5:
            raise DataError(
                f"{where}: expected 5 fields 'class x_center y_center width height', "
                f"got {len(fields)}: {line.strip()!r}"
            )
        try:
            values = [float(field) for field in fields]
        except ValueError:
            raise DataError(f"{where}: fields must be numbers, got {line.strip()!r}") from None
        label = values[0]
        if not math.isfinite(label) or label < 0 or label != int(label):
            raise DataError(f"{where}: the class must be a non-negative integer, got {fields[0]}")
        if num_classes is not None and label >= num_classes:
            raise DataError(
                f"{where}: class {int(label)} is out of range for {num_classes} classes"
            )
        x_center, y_center, width, height = values[1:]
        if not all(0.0 <= v <= 1.0 for v in values[1:]) or width <= 0 or height <= 0:
            raise DataError(
                f"{where}: coordinates must be normalised to [0, 1] with positive width and "
                f"height, got {x_center} {y_center} {width} {height}"
            )
        rows.append(values)
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


def read_voc_boxes(
    path: str | os.PathLike[str],
    classes: Sequence[str],
    image_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Read a Pascal VOC xml annotation as normalised YOLO-style boxes.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.xml`` file (``size/width``, ``size/height``, ``object/name``,
        ``object/bndbox/{xmin,ymin,xmax,ymax}`` in pixels).
    classes : sequence of str
        Class names; an object's class index is its name's position (case-insensitive).
    image_size : (int, int), optional
        ``(height, width)`` of the annotated image. When given, boxes are normalised by it
        (the pixels are the truth) and ``<size>`` may be absent; otherwise ``<size>`` is
        required.

    Returns
    -------
    torch.Tensor
        float32 (M, 5): ``[class, x_center, y_center, width, height]`` normalised.

    Raises
    ------
    DataError
        For unreadable xml, a missing size or box field, or an unknown class name (naming the
        file and the object).

    Example
    -------
    >>> from pathlib import Path
    >>> _ = Path("00000.xml").write_text(
    ...     "<annotation><size><width>200</width><height>100</height></size><object>"
    ...     "<name>Car</name><bndbox><xmin>20</xmin><ymin>10</ymin><xmax>60</xmax>"
    ...     "<ymax>50</ymax></bndbox></object></annotation>"
    ... )
    >>> read_voc_boxes("00000.xml", ["People", "Car"]).tolist()
    [[1.0, 0.20000000298023224, 0.30000001192092896, 0.20000000298023224, 0.4000000059604645]]
    """
    path = Path(path)
    lookup = {name.lower(): index for index, name in enumerate(classes)}
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as error:
        raise DataError(f"cannot read annotation {path}: {error}") from None
    if image_size is not None:
        height, width = float(image_size[0]), float(image_size[1])
    else:
        try:
            width = float(root.findtext("size/width"))
            height = float(root.findtext("size/height"))
        except (TypeError, ValueError):
            raise DataError(f"{path}: missing or bad <size><width>/<height>") from None
    if width <= 0 or height <= 0:
        raise DataError(f"{path}: image size must be positive, got {width}x{height}")
    rows = []
    for number, item in enumerate(root.iter("object"), start=1):
        name = (item.findtext("name") or "").strip()
        if name.lower() not in lookup:
            raise DataError(
                f"{path}: object {number} has class {name!r}, expected one of {list(classes)}"
            )
        try:
            x_min, y_min, x_max, y_max = (
                float(item.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax")
            )
        except (TypeError, ValueError):
            raise DataError(
                f"{path}: object {number} ({name}) has a missing or bad <bndbox>"
            ) from None
        x_min, x_max = max(0.0, x_min), min(width, x_max)
        y_min, y_max = max(0.0, y_min), min(height, y_max)
        if x_max <= x_min or y_max <= y_min:
            continue  # a box entirely outside the image carries no object
        rows.append(
            [
                lookup[name.lower()],
                (x_min + x_max) / 2 / width,
                (y_min + y_max) / 2 / height,
                (x_max - x_min) / width,
                (y_max - y_min) / height,
            ]
        )
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)


def read_mask(path: str | os.PathLike[str], num_classes: int | None = None) -> torch.Tensor:
    """Read a segmentation label image as class indices.

    Parameters
    ----------
    path : str or os.PathLike
        A single-channel (or palette) PNG whose pixel values are class indices.
    num_classes : int, optional
        When given, values must be below it (255 is allowed as the usual "ignore" value).

    Returns
    -------
    torch.Tensor
        int64 (H, W).

    Raises
    ------
    DataError
        If the file cannot be read, has colour channels, or holds out-of-range classes.

    Example
    -------
    >>> import numpy as np
    >>> from PIL import Image
    >>> Image.fromarray(np.array([[0, 2], [8, 255]], dtype=np.uint8)).save("mask.png")
    >>> read_mask("mask.png", num_classes=9).tolist()
    [[0, 2], [8, 255]]
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16", "1"):
                raise DataError(
                    f"segmentation label {path} has mode {image.mode}; expected a single-channel "
                    "image of class indices"
                )
            mask = np.asarray(image, dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f"segmentation label {path} does not exist") from None
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"cannot read segmentation label {path}: {error}") from None
    if num_classes is not None:
        bad = (mask >= num_classes) & (mask != 255)
        if bad.any():
            raise DataError(
                f"segmentation label {path} holds class {int(mask[bad].max())}, out of range for "
                f"{num_classes} classes"
            )
    return torch.from_numpy(mask)
