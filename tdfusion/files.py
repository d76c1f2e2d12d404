"""Files: listing images, pairing folders by stem, and writing files atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tdfusion.errors import DataError

__all__ = ["IMAGE_SUFFIXES", "atomic_path", "atomic_save", "list_images", "pair_folders"]

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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block succeeds.

    Whatever is written to the yielded path becomes ``path`` in one rename (atomic on POSIX and
    Windows), so an interrupted write leaves either the old file or the new one, never half of
    one; on an error the temporary file is removed. Missing parent folders are created.

    Parameters
    ----------
    path : str or os.PathLike
        The destination.

    Yields
    ------
    pathlib.Path
        The temporary file to write (same folder and suffix as ``path``).

    Example
    -------
    >>> with atomic_path("notes.txt") as temporary:
    ...     _ = temporary.write_text("complete or not at all")
    >>> Path("notes.txt").read_text()
    'complete or not at all'
    """
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{destination.name}.", suffix=f".tmp{destination.suffix}", dir=destination.parent
    )
    os.close(handle)
    try:
        yield Path(temporary)
        with open(temporary, "rb+") as stream:  # flush to disk before the rename
            os.fsync(stream.fileno())
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with :func:`torch.save` atomically (see :func:`atomic_path`).

    Parameters
    ----------
    obj : Any
        What to save (tensors, dicts, lists, numbers, strings).
    path : str or os.PathLike
        Destination; missing parent folders are created.

    Returns
    -------
    pathlib.Path
        The destination path.
    """
    import torch

    with atomic_path(path) as temporary:
        torch.save(obj, temporary)
    return Path(path)
