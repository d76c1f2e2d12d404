"""Files: listing images, pairing folders by stem, and writing files atomically."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from tdfusion.errors import DataError, OutputInUseError

__all__ = [
    "IMAGE_SUFFIXES",
    "LOCK_NAME",
    "NAME_MAX",
    "atomic_path",
    "atomic_save",
    "list_images",
    "output_lock",
    "pair_folders",
    "remove_stale_temporaries",
    "temporary_name",
]

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
        Role -> folder, e.g. ``{"infrared": ir_dir, "visible": vis_dir}``; or role -> file,
        when every path is an image file: then they form one pair, named by the first
        file's stem.
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
    paths = {role: Path(folder) for role, folder in folders.items()}
    if all(path.is_file() for path in paths.values()):
        # Single files form one pair, whatever their names; it takes the first file's stem.
        for role, path in paths.items():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(
                    f"{role} file {path} is not an image ({', '.join(IMAGE_SUFFIXES)} expected)"
                )
        return [(next(iter(paths.values())).stem, paths)]
    listings = {role: list_images(folder, role) for role, folder in folders.items()}
    problems = unpaired_stems(listings)
    if problems and not skip_unpaired:
        shown = "; ".join(problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"unpaired images: {shown}{more}")
    common = set.intersection(*(set(images) for images in listings.values()))
    return [(stem, {role: listings[role][stem] for role in listings}) for stem in sorted(common)]


#: Longest file name most file systems accept (bytes); temporary and lock names stay within it.
NAME_MAX = 255
#: Temporary files of writers that died are removed once older than this (seconds), even when
#: their process cannot be checked (another host on a shared file system).
STALE_AFTER_SECONDS = 24 * 3600
_TEMPORARY_MARK = "tdfusion-tmp"
# ".<part of the destination name>.tdfusion-tmp-<host>-<pid>-<token>.tmp<suffix>"
_TEMPORARY_NAME = re.compile(
    rf"^\..*\.{_TEMPORARY_MARK}-(?P<host>[0-9a-f]{{6}})-(?P<pid>\d+)-[0-9a-f]{{8}}\.tmp(\.[^.]*)?$"
)
# What releases before 0.4 left behind (tempfile.mkstemp names): removed on age alone.
_LEGACY_TEMPORARY_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp(\.[^.]*)?$")
_cleaned_folders: set[Path] = set()


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _fit_name(name: str, reserved: int) -> str:
    """``name`` cut (on a character boundary) so that it takes at most ``NAME_MAX - reserved``
    bytes, with a short hash of the whole name kept when it was cut."""
    budget = NAME_MAX - reserved
    if len(name.encode()) <= budget:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    kept = name.encode()[: budget - len(digest) - 1].decode(errors="ignore")
    return f"{kept}~{digest}"


def temporary_name(destination: str | os.PathLike[str]) -> str:
    """The name of a fresh temporary file for an atomic write of ``destination``.

    The name is hidden (leading dot), carries this process's host and id (so that a later run
    can tell an orphan from a write in progress), keeps the destination's suffix (image writers
    choose the format from it) and always fits in :data:`NAME_MAX` bytes, however long the
    destination's name.

    Parameters
    ----------
    destination : str or os.PathLike
        The file being written.

    Returns
    -------
    str
        A file name (no folder).

    Example
    -------
    >>> name = temporary_name("out/" + "x" * 300 + ".png")
    >>> name.endswith(".tmp.png"), len(name.encode()) <= NAME_MAX
    (True, True)
    """
    destination = Path(destination)
    suffix = destination.suffix if len(destination.suffix) <= 16 else ""
    tail = f".{_TEMPORARY_MARK}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}"
    return f".{_fit_name(destination.name, len(tail.encode()) + 1)}{tail}"


def _process_is_gone(pid: int) -> bool:
    if os.name != "posix":
        return False  # no cheap check: rely on the age
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but belongs to someone else
        return False
    return False


def _is_stale_temporary(path: Path, now: float) -> bool:
    match = _TEMPORARY_NAME.match(path.name)
    if match is None and _LEGACY_TEMPORARY_NAME.match(path.name) is None:
        return False
    try:
        status = path.lstat()
    except OSError:
        return False
    if not stat.S_ISREG(status.st_mode):
        return False
    if now - status.st_mtime > STALE_AFTER_SECONDS:
        return True
    return (
        match is not None
        and match["host"] == _host_tag()
        and int(match["pid"]) != os.getpid()
        and _process_is_gone(int(match["pid"]))
    )


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that killed atomic writes left in ``folder``.

    Only hidden files named as :func:`temporary_name` names them (or as earlier releases did)
    are considered, and only those whose writer is no longer running on this host or that are
    older than ``STALE_AFTER_SECONDS`` (a day); every other file is left alone.

    Parameters
    ----------
    folder : str or os.PathLike
        The folder to tidy (not recursive); a missing folder is fine.

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    folder = Path(folder)
    removed = []
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for path in entries:
        if path.name.startswith(".") and _is_stale_temporary(path, now):
            with contextlib.suppress(FileNotFoundError):  # another process removed it first
                path.unlink()
                removed.append(path)
    return removed


def _create_following_umask(path: Path, like: Path) -> None:
    # mkstemp would create the file 0600; os.open with 0o666 lets the umask decide, as for any
    # other file. A file being replaced keeps its permissions.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.fchmod(descriptor, stat.S_IMODE(like.stat().st_mode))
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block succeeds.

    Whatever is written to the yielded path becomes ``path`` in one rename (atomic on POSIX and
    Windows), so an interrupted write leaves either the old file or the new one, never half of
    one. The temporary file is removed whenever the block does not complete (an error, Ctrl-C,
    a signal handler that raises); temporary files of killed writers are removed by the first
    atomic write into the same folder (see :func:`remove_stale_temporaries`). The new file gets
    the permissions of the file it replaces, or those the umask gives a new file. Missing parent
    folders are created.

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
    folder = destination.parent.resolve()
    if folder not in _cleaned_folders:
        remove_stale_temporaries(folder)
        _cleaned_folders.add(folder)
    temporary = destination.parent / temporary_name(destination)
    replaced = False
    try:
        _create_following_umask(temporary, destination)
        yield temporary
        with open(temporary, "rb+") as stream:  # flush to disk before the rename
            os.fsync(stream.fileno())
        os.replace(temporary, destination)
        replaced = True
    finally:
        if not replaced:
            temporary.unlink(missing_ok=True)


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


LOCK_NAME = ".tdfusion.lock"


@contextlib.contextmanager
def output_lock(
    folder: str | os.PathLike[str], name: str = "", *, purpose: str = ""
) -> Iterator[Path]:
    """Hold an exclusive advisory lock on an output folder (or on one file in it) for a block.

    Two processes that write into one folder (two ``tdfusion fuse`` runs, two trainings with
    one checkpoint) would silently mix their outputs; with this lock the second fails at once.
    The lock is an ``fcntl.flock`` on a hidden file in ``folder``: the kernel releases it
    when the process ends however it ends, so a crashed run never leaves a stale lock (the file
    itself stays, harmlessly). Without ``fcntl`` (Windows) no lock is taken.

    Parameters
    ----------
    folder : str or os.PathLike
        The output folder (created if missing).
    name : str
        Lock one file of the folder rather than the folder: ``".<name>.lock"`` is used instead
        of ``.tdfusion.lock`` (e.g. ``name="checkpoint.pt"``).
    purpose : str
        What the holder does (``"tdfusion fuse"``), recorded in the lock file and shown to the
        process that finds the lock taken.

    Yields
    ------
    pathlib.Path
        The lock file.

    Raises
    ------
    OutputInUseError
        If another process (or another block of this one) holds the lock.

    Example
    -------
    >>> with output_lock("fused", purpose="an example"):
    ...     pass  # write into fused/
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock_file = folder / (f".{_fit_name(name, len('..lock'))}.lock" if name else LOCK_NAME)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield lock_file
        return
    target = f"{folder / name}" if name else f"output folder {folder}"
    descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
            holder = f" ({holder})" if holder else ""
            raise OutputInUseError(
                f"{target} is in use by another tdfusion process{holder}; wait for it to finish "
                "or choose another output"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()}{': ' + purpose if purpose else ''}".encode(), 0)
        yield lock_file
    finally:
        os.close(descriptor)  # releases the lock
