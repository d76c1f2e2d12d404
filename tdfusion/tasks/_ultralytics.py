"""Import ultralytics (the optional ``det`` extra, AGPL-3.0) without its import-time side effects.

Importing ``ultralytics`` for the first time

- resolves two host names to decide whether it is online (``YOLO_OFFLINE=1`` skips it);
- writes a settings file ``Ultralytics/settings.json`` under ``$YOLO_CONFIG_DIR`` or the user's
  config folder (``~/.config`` on Linux);
- replaces ``torch.save`` with a retrying wrapper, sets numpy's and torch's print options, adds
  warning filters and sets a few environment variables (``OMP_NUM_THREADS=1`` among them).

:func:`load_ultralytics` imports it once with ``YOLO_OFFLINE=1`` and ``YOLO_CONFIG_DIR`` pointing
to a folder in the temporary directory (each only if the user has not set it), and restores
``torch.save``, the print options, the warning filters and the environment afterwards. Nothing
here plots, so ultralytics never fetches its fonts. OpenCV's thread count
(``cv2.setNumThreads(0)``) is left as ultralytics sets it.

Written against ultralytics 8.4, whose detect head returns its raw outputs as a dict that
``v8DetectionLoss`` returns per component; older releases are refused with a clear message.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import logging
import os
import sys
import tempfile
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tdfusion.errors import OptionalDependencyError

__all__ = ["INSTALL_HINT", "config_dir", "load_ultralytics", "quiet_ultralytics_logger"]

INSTALL_HINT = "pip install 'tdfusion[det]'"

#: Oldest ultralytics release whose detect head and loss exchange dict outputs, as used here.
MINIMUM_VERSION = (8, 4)

_MODULES = {
    "tasks": "ultralytics.nn.tasks",
    "loss": "ultralytics.utils.loss",
    "nms": "ultralytics.utils.nms",
    "metrics": "ultralytics.utils.metrics",
    "validator": "ultralytics.engine.validator",
}


def config_dir() -> Path:
    """The folder given to ultralytics as ``YOLO_CONFIG_DIR`` when the user has not set one.

    Returns
    -------
    pathlib.Path
        ``<tempdir>/tdfusion-ultralytics-<uid>``; ultralytics writes ``Ultralytics/settings.json``
        inside it.

    Example
    -------
    >>> config_dir().name.startswith("tdfusion-ultralytics")
    True
    """
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    return Path(tempfile.gettempdir()) / f"tdfusion-ultralytics-{user}"


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def quiet_ultralytics_logger() -> Iterator[None]:
    """Drop ultralytics' INFO messages (settings file created, ``nc`` overridden) for a while.

    Yields
    ------
    None

    Example
    -------
    >>> with quiet_ultralytics_logger():
    ...     pass
    """
    logger = logging.getLogger("ultralytics")
    quiet = _BelowWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@contextlib.contextmanager
def _restore_global_state() -> Iterator[None]:
    from PIL import Image

    environment = dict(os.environ)
    torch_save = torch.save
    # ultralytics replaces PIL.Image.open process-wide with a wrapper that, on an unidentified
    # image, tries to install and import a HEIF plugin: unreadable files would then raise
    # ModuleNotFoundError (or trigger a pip install) instead of PIL's own error.
    image_open = Image.open
    numpy_print = np.get_printoptions()
    get_torch_print = getattr(torch._tensor_str, "get_printoptions", None)
    torch_print = get_torch_print() if get_torch_print is not None else None
    with warnings.catch_warnings():
        try:
            yield
        finally:
            for key in set(os.environ) - set(environment):
                del os.environ[key]
            for key, value in environment.items():
                if os.environ.get(key) != value:
                    os.environ[key] = value
            torch.save = torch_save
            Image.open = image_open
            np.set_printoptions(**numpy_print)
            if torch_print is not None:
                torch.set_printoptions(**torch_print)


def _major_minor(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split(".")[:2]:
        digits = "".join(itertools.takewhile(str.isdigit, part))
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers)


@functools.cache
def load_ultralytics() -> types.SimpleNamespace:
    """Import the parts of ultralytics tdfusion uses, offline and without touching ``$HOME``.

    Returns
    -------
    types.SimpleNamespace
        ``DetectionModel``, ``v8DetectionLoss``, ``non_max_suppression``, ``ap_per_class``,
        ``box_iou`` and ``match_predictions`` (the validator's matching of predictions to ground
        truth, a plain function taking the IoU thresholds as ``self.iouv``), and for reading model
        yamls ``tasks`` (the ``ultralytics.nn.tasks`` module) and ``Conv``.

    Raises
    ------
    tdfusion.errors.OptionalDependencyError
        When ultralytics is not installed.

    Example
    -------
    >>> ultralytics = load_ultralytics()  # doctest: +SKIP
    >>> model = ultralytics.DetectionModel("yolov8n.yaml", ch=1, nc=6)  # doctest: +SKIP
    """
    first_import = "ultralytics" not in sys.modules
    with contextlib.ExitStack() as stack:
        if first_import:
            stack.enter_context(_restore_global_state())
            stack.enter_context(quiet_ultralytics_logger())
            os.environ.setdefault("YOLO_OFFLINE", "1")
            if "YOLO_CONFIG_DIR" not in os.environ:
                os.environ["YOLO_CONFIG_DIR"] = str(config_dir())
        try:
            modules = {key: importlib.import_module(name) for key, name in _MODULES.items()}
        except ImportError as error:
            raise OptionalDependencyError(
                f"the detection task needs ultralytics, which could not be imported ({error}); "
                f"install it with: {INSTALL_HINT}"
            ) from error
    version = getattr(sys.modules.get("ultralytics"), "__version__", "0")
    if _major_minor(version) < MINIMUM_VERSION:
        raise OptionalDependencyError(
            f"the detection task needs ultralytics>={'.'.join(map(str, MINIMUM_VERSION))}, found "
            f"{version}; upgrade it with: pip install -U 'ultralytics>=8.4'"
        )
    return types.SimpleNamespace(
        DetectionModel=modules["tasks"].DetectionModel,
        v8DetectionLoss=modules["loss"].v8DetectionLoss,
        non_max_suppression=modules["nms"].non_max_suppression,
        ap_per_class=modules["metrics"].ap_per_class,
        box_iou=modules["metrics"].box_iou,
        match_predictions=modules["validator"].BaseValidator.match_predictions,
        tasks=modules["tasks"],
        Conv=modules["tasks"].Conv,
    )
