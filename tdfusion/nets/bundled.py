"""Pretrained weights that ship inside the package, loadable by name (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_FUSION_WEIGHTS",
    "BundledWeights",
    "bundled_path",
    "default_pretrained",
    "list_pretrained",
]

#: Folder of the bundled weight files and their model cards.
WEIGHTS_FOLDER = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class BundledWeights:
    """One set of bundled weights.

    Attributes
    ----------
    name : str
        The name ``from_pretrained`` takes.
    file : str
        File name inside ``tdfusion/nets/weights/``.
    arch : str
        Registry name of the architecture (:func:`~tdfusion.nets.create_model`).
    summary : str
        One line: what the weights do and how they were trained.
    card : str
        File name of the model card next to the weights.
    """

    name: str
    file: str
    arch: str
    summary: str
    card: str

    @property
    def path(self) -> Path:
        """Where the weights lie in the installed package."""
        return WEIGHTS_FOLDER / self.file


_BUNDLED: dict[str, BundledWeights] = {
    "tdfusion-ivif": BundledWeights(
        name="tdfusion-ivif",
        file="tdfusion_ivif.pt",
        arch="refusion",
        summary=(
            "ReFusionNet for infrared-visible fusion, trained by tdfusion on 221 RoadScene "
            "pairs under the fusion loss with max-intensity weights (recipe roadscene-pretrain)"
        ),
        card="tdfusion_ivif.md",
    ),
}

#: The weights ``tdfusion fuse`` and the inference API use when no weights are given.
DEFAULT_FUSION_WEIGHTS = "tdfusion-ivif"


def list_pretrained() -> dict[str, str]:
    """The names of the bundled weights, each with one line saying what they are.

    Returns
    -------
    dict of str to str
        ``{name: summary}``, sorted by name.

    Example
    -------
    >>> from tdfusion.nets import list_pretrained
    >>> "tdfusion-ivif" in list_pretrained()
    True
    """
    return {name: _BUNDLED[name].summary for name in sorted(_BUNDLED)}


def bundled_weights(name: str) -> BundledWeights | None:
    """The bundled weights called ``name``, or ``None`` when no bundled weights have it."""
    return _BUNDLED.get(str(name))


def default_pretrained(arch: str) -> str | None:
    """The name of the bundled weights ``create_model(arch, pretrained=True)`` loads.

    Parameters
    ----------
    arch : str
        Registry name of an architecture (``"refusion"``, ...).

    Returns
    -------
    str or None
        :data:`DEFAULT_FUSION_WEIGHTS` when they are for ``arch``, else the first (by name)
        bundled weights for ``arch``; ``None`` when no bundled weights are for it.

    Example
    -------
    >>> default_pretrained("refusion")
    'tdfusion-ivif'
    >>> default_pretrained("loss_generator") is None
    True
    """
    if _BUNDLED[DEFAULT_FUSION_WEIGHTS].arch == arch:
        return DEFAULT_FUSION_WEIGHTS
    return next((name for name in sorted(_BUNDLED) if _BUNDLED[name].arch == arch), None)


def bundled_path(name: str) -> Path | None:
    """The file of the bundled weights called ``name``, or ``None`` for any other name.

    Parameters
    ----------
    name : str
        A name of :func:`list_pretrained`.

    Returns
    -------
    pathlib.Path or None
        The path inside the installed package.

    Example
    -------
    >>> bundled_path("tdfusion-ivif").name
    'tdfusion_ivif.pt'
    >>> bundled_path("weights/ReFusion_IVIF.pth") is None
    True
    """
    entry = bundled_weights(name)
    return None if entry is None else entry.path
