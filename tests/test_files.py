"""Atomic writes (file modes, long names, interrupted and killed writers) and output locks."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tdfusion.errors import DataError, OutputInUseError
from tdfusion.files import (
    NAME_MAX,
    STALE_AFTER_SECONDS,
    atomic_path,
    atomic_save,
    output_lock,
    remove_stale_temporaries,
    temporary_name,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and signals")


def hidden_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


@posix_only
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        written = atomic_save({"x": torch.zeros(2)}, tmp_path / "checkpoint.pt")
        plain = tmp_path / "plain.txt"
        plain.write_text("a file written the ordinary way")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(written.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


@posix_only
def test_a_replaced_file_keeps_its_permissions(tmp_path):
    path = tmp_path / "weights.pt"
    atomic_save(1, path)
    path.chmod(0o640)
    atomic_save(2, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize(
    "name", ["x" * 228 + ".png", "x" * 251 + ".png", "é" * 125 + ".png", "x" * 255]
)
def test_temporary_names_fit_however_long_the_destination(tmp_path, name):
    destination = tmp_path / name
    assert len(temporary_name(destination).encode()) <= NAME_MAX
    with atomic_path(destination) as temporary:
        temporary.write_bytes(b"data")
    assert destination.read_bytes() == b"data"
    assert hidden_files(tmp_path) == []


class Interrupted(BaseException):
    """What a signal handler raises (as SystemExit and KeyboardInterrupt do)."""


@posix_only
def test_a_signal_during_an_atomic_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save("old", path)

    def handler(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Interrupted), atomic_path(path) as temporary:
            temporary.write_bytes(b"half a checkpo")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs before this returns
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert hidden_files(tmp_path) == []
    assert torch.load(path, weights_only=True) == "old"


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from tdfusion.files import atomic_path
    with atomic_path(sys.argv[1]) as temporary:
        temporary.write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


@posix_only
def test_temporary_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    folder = tmp_path / "run"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    orphans = []
    for name in ("checkpoint.pt", "fused.png"):
        result = subprocess.run(
            [sys.executable, "-c", KILLED_WRITER, str(folder / name)], env=environment
        )
        assert result.returncode == -signal.SIGKILL
        orphans.append(hidden_files(folder))
    assert len(orphans[0]) == len(orphans[1]) == 1  # the second writer removed the first orphan
    assert orphans[0] != orphans[1]
    orphans = orphans[1]
    # Left alone: a write in progress in this process, a young file of a release before this
    # one, and hidden files that only look a little like ours.
    in_progress = folder / temporary_name(folder / "other.pt")
    in_progress.write_bytes(b"")
    legacy_young = folder / ".checkpoint.pt.ab12cd_9.tmp.pt"
    bystanders = [".notes.tmp", ".checkpoint.pt.tdfusion-tmp-zzzzzz-1-12345678.tmp", "a.tmp.pt"]
    for name in [legacy_young.name, *bystanders]:
        (folder / name).write_bytes(b"keep me")
    legacy_old = folder / ".checkpoint.pt.qwertyui.tmp.pt"
    legacy_old.write_bytes(b"")
    old = time.time() - STALE_AFTER_SECONDS - 60
    os.utime(legacy_old, (old, old))

    atomic_save("new", folder / "checkpoint.pt")

    left = hidden_files(folder)
    assert not set(orphans) & set(left)
    assert legacy_old.name not in left
    assert {in_progress.name, legacy_young.name, ".notes.tmp"} <= set(left)
    assert all((folder / name).exists() for name in bystanders)
    assert torch.load(folder / "checkpoint.pt", weights_only=True) == "new"


def test_removing_stale_temporaries_of_a_missing_folder_is_a_no_op(tmp_path):
    assert remove_stale_temporaries(tmp_path / "missing") == []


HOLDER = textwrap.dedent(
    """
    import sys, time
    from tdfusion.files import output_lock
    with output_lock(sys.argv[1], purpose="tdfusion fuse"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


@posix_only
def test_a_second_writer_fails_with_one_line_and_a_killed_holder_leaves_no_lock(tmp_path):
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=environment,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputInUseError) as caught, output_lock(tmp_path):
            pass
        message = str(caught.value)
        assert "\n" not in message
        assert str(tmp_path) in message and f"pid {holder.pid}: tdfusion fuse" in message
    finally:
        holder.kill()
        holder.wait()
    with output_lock(tmp_path):  # the kernel released the dead holder's lock
        pass


def test_locks_on_a_folder_and_on_a_file_in_it_are_independent(tmp_path):
    with output_lock(tmp_path), output_lock(tmp_path, "checkpoint.pt"):
        with pytest.raises(OutputInUseError, match="checkpoint.pt is in use"):
            with output_lock(tmp_path, "checkpoint.pt"):
                pass
    with output_lock(tmp_path):  # released at the end of the block
        pass


def test_two_image_files_are_one_pair_named_after_the_first(tmp_path):
    from tdfusion.files import pair_folders

    first, second = tmp_path / "thermal.png", tmp_path / "colour.jpg"
    first.write_bytes(b"")
    second.write_bytes(b"")
    assert pair_folders({"infrared": first, "visible": second}) == [
        ("thermal", {"infrared": first, "visible": second})
    ]
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(DataError, match="notes.txt is not an image"):
        pair_folders({"infrared": first, "visible": text})


@posix_only
def test_a_read_only_file_is_replaced_and_stays_read_only(tmp_path, monkeypatch):
    import tdfusion.files as files
    from tdfusion.data.io import write_image

    path = tmp_path / "fused.png"
    write_image(path, torch.zeros(3, 4).numpy())
    path.chmod(0o444)
    modes_at_replace = []
    replace = os.replace

    def recording_replace(source, destination):
        modes_at_replace.append(stat.S_IMODE(os.stat(source).st_mode))
        replace(source, destination)

    monkeypatch.setattr(files.os, "replace", recording_replace)
    with atomic_path(path) as temporary:
        # writable while written (as root the permission check would pass anyway): the old
        # file's mode is applied only once it is written
        assert stat.S_IMODE(temporary.stat().st_mode) & stat.S_IWUSR
        temporary.write_bytes(b"new")
    assert path.read_bytes() == b"new" and modes_at_replace == [0o444]
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    write_image(path, torch.full((3, 4), 9.0).numpy())  # a re-run over a read-only output
    assert stat.S_IMODE(path.stat().st_mode) == 0o444 and hidden_files(tmp_path) == []


@posix_only
def test_writing_through_a_symbolic_link_updates_the_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "store" / "checkpoint.pt"
    atomic_save({"step": 1}, target)
    target.chmod(0o640)
    link = tmp_path / "runs" / "latest.pt"
    link.parent.mkdir()
    link.symlink_to(target)
    assert atomic_save({"step": 2}, link) == link
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert torch.load(target)["step"] == 2 and torch.load(link)["step"] == 2
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert hidden_files(link.parent) == [] and hidden_files(target.parent) == []
    dangling = tmp_path / "runs" / "next.pt"
    dangling.symlink_to(tmp_path / "store" / "new" / "next.pt")  # target not there yet
    atomic_save({"step": 3}, dangling)
    assert dangling.is_symlink() and torch.load(tmp_path / "store" / "new" / "next.pt")["step"] == 3


def test_an_output_folder_that_cannot_be_made_is_a_data_error_and_leaves_nothing(tmp_path):
    from tdfusion.files import missing_folders, remove_unused_folders

    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub"
    with pytest.raises(DataError, match=r"cannot create the output folder .*afile is a file"):
        with output_lock(out):
            pass
    remove_unused_folders(missing_folders(out), out, {".tdfusion.lock"})  # nothing to remove
    assert (tmp_path / "afile").read_text() == "x"
    new = tmp_path / "new" / "deeper"
    created = missing_folders(new)
    new.mkdir(parents=True)
    (new / ".tdfusion.lock").write_text("")
    remove_unused_folders(created, new, {".tdfusion.lock"})
    assert not (tmp_path / "new").exists()
