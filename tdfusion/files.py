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
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from tdfusion.errors import DataError, OutputInUseError

__all__ = [
    "IMAGE_SUFFIXES",
    "LOCK_NAME",
    "NAME_MAX",
    "atomic_path",
    "atomic_save",
    "list_images",
    "missing_folders",
    "output_lock",
    "pair_folders",
    "pair_folders_reporting",
    "remove_stale_temporaries",
    "remove_unused_folders",
    "temporary_name",
]

#: File suffixes (lower case) read as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _image_suffixes(extensions: Sequence[str] | None = None) -> tuple[str, ...]:
    """The image suffixes to read: ``extensions`` normalised (lower case, leading dot), or all.

    Parameters
    ----------
    extensions : sequence of str, optional
        Suffixes such as ``["png", ".JPG"]``; default: :data:`IMAGE_SUFFIXES`.

    Returns
    -------
    tuple of str
        The suffixes.

    Raises
    ------
    ValueError
        If a suffix is not one of :data:`IMAGE_SUFFIXES`.
    """
    if extensions is None:
        return IMAGE_SUFFIXES
    wanted = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    unsupported = sorted(wanted - set(IMAGE_SUFFIXES))
    if unsupported:
        raise ValueError(
            f"unsupported image extensions {unsupported}; supported: {', '.join(IMAGE_SUFFIXES)}"
        )
    return tuple(sorted(wanted))


def list_images(
    folder: str | Path, role: str = "image", *, extensions: Sequence[str] | None = None
) -> dict[str, Path]:
    """Map file stem to path for the image files directly inside ``folder``.

    Parameters
    ----------
    folder : str or pathlib.Path
        Folder to list (not recursive).
    role : str
        What the folder holds ("fused", "infrared", ...), for error messages.
    extensions : sequence of str, optional
        Only list files with these suffixes (e.g. ``[".png"]``); default: every suffix of
        :data:`IMAGE_SUFFIXES`.

    Returns
    -------
    dict of str to pathlib.Path
        Stem -> file, sorted by stem.

    Raises
    ------
    DataError
        If the folder does not exist, holds no image, or holds two images with one stem.
    ValueError
        If ``extensions`` names a suffix that is not an image suffix.
    """
    images, ambiguous = _scan_images(folder, role, _image_suffixes(extensions))
    if ambiguous:
        raise DataError(_describe_ambiguous(role, folder, *next(iter(ambiguous.items()))))
    if not images:
        _raise_no_images(role, folder, extensions)
    return images


def _scan_images(
    folder: str | Path, role: str, suffixes: Sequence[str]
) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """The images directly inside ``folder``: stem -> file for the stems held once, and
    stem -> files for those held by two or more files (``x.JPG`` and ``x.png``), both sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{role} folder {folder} does not exist or is not a folder")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            found.setdefault(path.stem, []).append(path)
    images = {stem: files[0] for stem, files in sorted(found.items()) if len(files) == 1}
    ambiguous = {stem: files for stem, files in sorted(found.items()) if len(files) > 1}
    return images, ambiguous


def _describe_mixed(paths: Mapping[str, Path]) -> str:
    """One line for sources of which some are files and others are not: they must be all files
    (one pair) or all folders."""

    def kind(path: Path) -> str:
        if path.is_file():
            return "is a file"
        return "is a folder" if path.is_dir() else "does not exist"

    kinds = ", ".join(f"{role} {path} {kind(path)}" for role, path in paths.items())
    every = "both" if len(paths) == 2 else "all"
    return f"{kinds}: give {every} as image files (one pair) or {every} as folders"


def _describe_ambiguous(role: str, folder: str | Path, stem: str, files: Sequence[Path]) -> str:
    names = " and ".join(path.name for path in files)
    count = "two" if len(files) == 2 else str(len(files))
    return f"{role} folder {folder} holds {count} images named {stem!r}: {names}"


def _raise_no_images(role: str, folder: str | Path, extensions: Sequence[str] | None) -> NoReturn:
    if extensions is None:
        expected = f"image ({', '.join(IMAGE_SUFFIXES)} expected)"
    else:
        expected = f"{', '.join(_image_suffixes(extensions))} image"
    raise DataError(f"{role} folder {folder} holds no {expected}")


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


def _first_few(names: Sequence[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _describe_unpaired(
    listings: Mapping[str, Mapping[str, Path]], folders: Mapping[str, str | Path]
) -> str | None:
    """One line on the files whose stem is missing from another listing (None if none is).

    The files are grouped by the folder they are in and the roles they lack, each group with
    its count and first few names, e.g. ``unpaired images: 4 only in ir (c.png, d.png, e.png,
    ...); 1 only in vi (z.png); pairs are matched by file stem and c.png has no visible
    counterpart``.

    Parameters
    ----------
    listings : mapping of str to mapping of str to pathlib.Path
        Role -> (stem -> file), as :func:`list_images` returns.
    folders : mapping of str to path
        Role -> folder, as shown in the message.

    Returns
    -------
    str or None
        The message.
    """
    roles = list(listings)
    groups: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for stem in sorted(set().union(*listings.values())):
        present = [role for role in roles if stem in listings[role]]
        missing = tuple(role for role in roles if stem not in listings[role])
        if missing:
            groups.setdefault((present[0], missing), []).append(listings[present[0]][stem].name)
    if not groups:
        return None
    parts = []
    for (role, missing), names in sorted(groups.items(), key=lambda item: roles.index(item[0][0])):
        where = (
            f"only in {folders[role]}"
            if len(missing) == len(roles) - 1
            else f"in {folders[role]} with no {' or '.join(missing)} counterpart"
        )
        parts.append(f"{len(names)} {where} ({_first_few(names)})")
    (_, missing), names = min(groups.items(), key=lambda item: roles.index(item[0][0]))
    return (
        f"unpaired images: {'; '.join(parts)}; pairs are matched by file stem and "
        f"{names[0]} has no {' or '.join(missing)} counterpart"
    )


def pair_folders(
    folders: Mapping[str, str | Path],
    *,
    skip_unpaired: bool = False,
    extensions: Sequence[str] | None = None,
) -> list[tuple[str, dict[str, Path]]]:
    """Pair the images of several folders by file stem.

    Parameters
    ----------
    folders : mapping of str to path
        Role -> folder, e.g. ``{"infrared": ir_dir, "visible": vis_dir}``; or role -> file,
        when every path is an image file: then they form one pair, named by the first
        file's stem.
    skip_unpaired : bool
        Drop stems that are not in every folder, or held by two images of one folder
        (``x.JPG`` and ``x.png``), instead of raising (:func:`pair_folders_reporting` lists
        them).
    extensions : sequence of str, optional
        Only read files with these suffixes (e.g. ``[".png"]``); default: every suffix of
        :data:`IMAGE_SUFFIXES`.

    Returns
    -------
    list of (str, dict of str to pathlib.Path)
        ``(stem, {role: file})`` sorted by stem.

    Raises
    ------
    DataError
        If a folder is missing or empty, or (unless ``skip_unpaired``) a name is not in every
        folder (the message counts the unpaired files of each folder and names the first few)
        or is held by two images of one folder.
    ValueError
        If ``extensions`` names a suffix that is not an image suffix.
    """
    return pair_folders_reporting(folders, skip_unpaired=skip_unpaired, extensions=extensions)[0]


def pair_folders_reporting(
    folders: Mapping[str, str | Path],
    *,
    skip_unpaired: bool = False,
    extensions: Sequence[str] | None = None,
) -> tuple[list[tuple[str, dict[str, Path]]], list[tuple[str, str]]]:
    """:func:`pair_folders`, with what ``skip_unpaired`` dropped.

    With ``skip_unpaired``, a stem held by two images of one folder (``x.JPG`` and ``x.png``:
    which one to fuse is ambiguous) is dropped like an unpaired one; without it, it is an error.

    Parameters
    ----------
    folders : mapping of str to path
        Role -> folder, or role -> file (see :func:`pair_folders`).
    skip_unpaired : bool
        Drop stems that are not in every folder, or held by two images of one folder, instead
        of raising.
    extensions : sequence of str, optional
        Only read files with these suffixes; default: every suffix of :data:`IMAGE_SUFFIXES`.

    Returns
    -------
    pairs : list of (str, dict of str to pathlib.Path)
        ``(stem, {role: file})`` sorted by stem.
    skipped : list of (str, str)
        ``(name, reason)`` of what was dropped: ``("unpaired", line)`` for a file without a
        counterpart (one per file, as ``unpaired_stems`` words it) and ``(stem, line)``
        naming the files of an ambiguous stem. Empty without ``skip_unpaired``.

    Raises
    ------
    DataError
        As :func:`pair_folders`.
    ValueError
        If ``extensions`` names a suffix that is not an image suffix.
    """
    suffixes = _image_suffixes(extensions)
    paths = {role: Path(folder) for role, folder in folders.items()}
    if all(path.is_file() for path in paths.values()):
        # Single files form one pair, whatever their names; it takes the first file's stem.
        for role, path in paths.items():
            if path.suffix.lower() not in suffixes:
                raise DataError(
                    f"{role} file {path} is not an image ({', '.join(suffixes)} expected)"
                )
        return [(next(iter(paths.values())).stem, paths)], []
    if any(path.is_file() for path in paths.values()):
        raise DataError(_describe_mixed(paths))
    scans = {role: _scan_images(path, role, suffixes) for role, path in paths.items()}
    skipped: list[tuple[str, str]] = []
    dropped: set[str] = set()
    for role, (images, ambiguous) in scans.items():
        for stem, files in ambiguous.items():
            problem = _describe_ambiguous(role, paths[role], stem, files)
            if not skip_unpaired:
                raise DataError(problem)
            skipped.append((stem, f"{problem}; pairs are matched by file stem, so it is skipped"))
            dropped.add(stem)
        if not images and not ambiguous:
            _raise_no_images(role, paths[role], extensions)
    listings = {
        role: {stem: path for stem, path in images.items() if stem not in dropped}
        for role, (images, _) in scans.items()
    }
    problem = _describe_unpaired(listings, paths)
    if problem is not None and not skip_unpaired:
        raise DataError(problem)
    skipped.extend(("unpaired", line) for line in unpaired_stems(listings))
    common = set.intersection(*(set(images) for images in listings.values()))
    pairs = [(stem, {role: listings[role][stem] for role in listings}) for stem in sorted(common)]
    return pairs, skipped


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


def _create_following_umask(path: Path) -> None:
    # mkstemp would create the file 0600; os.open with 0o666 lets the umask decide, as for any
    # other file. The file stays writable while it is written (writers such as Image.save open
    # it again by name); the permissions of a file it replaces are applied just before the
    # rename (see atomic_path).
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _permissions(path: Path) -> int | None:
    """The permission bits of ``path``, or None if it does not exist."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block succeeds.

    Whatever is written to the yielded path becomes ``path`` in one rename (atomic on POSIX and
    Windows), so an interrupted write leaves either the old file or the new one, never half of
    one. The temporary file is removed whenever the block does not complete (an error, Ctrl-C,
    a signal handler that raises); temporary files of killed writers are removed by the first
    atomic write into the same folder (see :func:`remove_stale_temporaries`). The new file gets
    the permissions of the file it replaces (applied once it is written, so a read-only file
    can be replaced), or those the umask gives a new file. Missing parent folders are created.
    A symbolic link is followed: its target is replaced and the link kept.

    Parameters
    ----------
    path : str or os.PathLike
        The destination (or a symbolic link to it).

    Yields
    ------
    pathlib.Path
        The temporary file to write (same folder and suffix as the destination).

    Example
    -------
    >>> with atomic_path("notes.txt") as temporary:
    ...     _ = temporary.write_text("complete or not at all")
    >>> Path("notes.txt").read_text()
    'complete or not at all'
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    destination = Path(path).resolve()  # through symbolic links: replace the target, keep links
    destination.parent.mkdir(parents=True, exist_ok=True)  # a dangling link's target folder
    folder = destination.parent
    if folder not in _cleaned_folders:
        remove_stale_temporaries(folder)
        _cleaned_folders.add(folder)
    temporary = folder / temporary_name(destination)
    replaced = False
    try:
        _create_following_umask(temporary)
        yield temporary
        with open(temporary, "rb+") as stream:  # flush to disk before the rename
            os.fsync(stream.fileno())
        mode = _permissions(destination)
        if mode is not None:  # keep the permissions of the file replaced (0444 too)
            os.chmod(temporary, mode)
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
    DataError
        If ``folder`` cannot be created or written into (a file in its path, no permission);
        the message names the folder and the reason.

    Example
    -------
    >>> with output_lock("fused", purpose="an example"):
    ...     pass  # write into fused/
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(_unusable_folder(folder, "create", error)) from None
    lock_file = folder / (f".{_fit_name(name, len('..lock'))}.lock" if name else LOCK_NAME)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield lock_file
        return
    target = f"{folder / name}" if name else f"output folder {folder}"
    try:
        descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise DataError(_unusable_folder(folder, "write into", error)) from None
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


def _unusable_folder(folder: Path, action: str, error: OSError) -> str:
    """One line: why the output ``folder`` cannot be created or written into (``action``),
    from ``error``, naming the file in its path that is not a folder when there is one."""
    reason = error.strerror or type(error).__name__
    blocking = next((parent for parent in folder.parents if parent.is_file()), None)
    if blocking is not None:
        reason = f"{blocking} is a file, not a folder"
    return f"cannot {action} the output folder {folder}: {reason}; choose another folder"


def missing_folders(folder: str | os.PathLike[str]) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, innermost first.

    Example
    -------
    >>> [p.name for p in missing_folders(Path("new") / "deeper")]
    ['deeper', 'new']
    """
    missing = []
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_unused_folders(created: Sequence[Path], out: Path, own_files: Collection[str]) -> None:
    """After a failed start, remove the folders a run created (``created``, innermost first,
    as :func:`missing_folders` lists them) when ``out`` holds nothing but the ``own_files`` the
    run itself wrote before failing; those files go too. Folders that were never made (``out``
    could not be created) are passed over."""
    if not created:
        return
    if out.is_dir():
        if not {path.name for path in out.iterdir()} <= set(own_files):
            return
        for name in own_files:
            (out / name).unlink(missing_ok=True)
    for folder in created:
        try:
            folder.rmdir()
        except FileNotFoundError:  # creating it failed
            continue
        except OSError:  # not empty: something else was put there meanwhile
            return
