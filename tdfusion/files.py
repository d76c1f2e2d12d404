"""Finding image files in folders and pairing folders by file stem, with errors naming the files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tdfusion.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "list_images", "pair_folders"]

#: File suffixes (lower case) read as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def list_images(folder: str | Path, role: str = "image") -> dict[str, Path]:
    """Map file stem to path for the image files directly inside ``folder``.

    Parameters
    ----------
    folder : str or pathlib.Path
        Folder to list (not recursive).
    role : str
        What the folder holds ("fused", "infrared", ...), for error messages.

    Returns
    -------
    dict of str to pathlib.Path
        Stem -> file, sorted by stem.

    Raises
    ------
    DataError
        If the folder does not exist, holds no image, or holds two images with one stem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{role} folder {folder} does not exist or is not a folder")
    images: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in images:
            raise DataError(
                f"{role} folder {folder} holds two images named {path.stem!r}: "
                f"{images[path.stem].name} and {path.name}"
            )
        images[path.stem] = path
    if not images:
        raise DataError(
            f"{role} folder {folder} holds no image ({', '.join(IMAGE_SUFFIXES)} expected)"
        )
    return dict(sorted(images.items()))


def unpaired_stems(listings: Mapping[str, Mapping[str, Path]]) -> list[str]:
    """One line per file whose stem is missing from another listing (for error messages)."""
    all_stems = set().union(*listings.values())
    problems = []
    for stem in sorted(all_stems):
        missing = [role for role, images in listings.items() if stem not in images]
        if missing:
            present = next(images[stem] for images in listings.values() if stem in images)
            problems.append(f"{present} has no {' or '.join(missing)} counterpart")
    return problems


def pair_folders(
    folders: Mapping[str, str | Path], *, skip_unpaired: bool = False
) -> list[tuple[str, dict[str, Path]]]:
    """Pair the images of several folders by file stem.

    Parameters
    ----------
    folders : mapping of str to path
        Role -> folder, e.g. ``{"infrared": ir_dir, "visible": vis_dir}``.
    skip_unpaired : bool
        Drop stems that are not in every folder instead of raising.

    Returns
    -------
    list of (str, dict of str to pathlib.Path)
        ``(stem, {role: file})`` sorted by stem.

    Raises
    ------
    DataError
        If a folder is missing or empty, or (unless ``skip_unpaired``) a name is not in every
        folder; the message names the first few unpaired files.
    """
    listings = {role: list_images(folder, role) for role, folder in folders.items()}
    problems = unpaired_stems(listings)
    if problems and not skip_unpaired:
        shown = "; ".join(problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"unpaired images: {shown}{more}")
    common = set.intersection(*(set(images) for images in listings.values()))
    return [(stem, {role: listings[role][stem] for role in listings}) for stem in sorted(common)]
