"""Reading, computing and writing overlapped: a reader thread, the caller, a writer thread.

:func:`run_overlapped` is how :func:`~tdfusion.inference.fuse_folders` keeps the network busy
while the next pairs are decoded and the previous outputs are encoded: the reader thread runs
ahead by a few items (a bounded queue), the calling thread computes (so the network stays on the
thread, device and settings of the caller), and the writer thread writes in order. PNG decoding
and encoding and PyTorch's kernels release the interpreter lock, so the three overlap.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["run_overlapped"]

_ReadT = TypeVar("_ReadT")
_ComputedT = TypeVar("_ComputedT")

_END = object()  # the last item of a queue
_POLL_SECONDS = 0.05  # how often a blocked thread looks whether the run was stopped


class _Stopped(Exception):
    """Raised inside the helper threads when the run is being stopped."""


def _put(items: queue.Queue, item: object, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            items.put(item, timeout=_POLL_SECONDS)
            return
        except queue.Full:
            continue


def _get(items: queue.Queue, stop: threading.Event) -> Any:
    while True:
        if stop.is_set():
            raise _Stopped
        try:
            return items.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            continue


def run_overlapped(
    source: Iterable[_ReadT],
    compute: Callable[[_ReadT], _ComputedT],
    write: Callable[[_ComputedT], None],
    *,
    prefetch: int = 2,
    writes_allowed: threading.Event | None = None,
) -> None:
    """Iterate ``source`` in a reader thread, ``compute`` here, ``write`` in a writer thread.

    Items keep their order: ``write`` sees ``compute(item)`` for every item of ``source``, one
    after the other, exactly as ``for item in source: write(compute(item))`` would, and the
    first error ends the run as that loop would end (see Raises).

    Parameters
    ----------
    source : iterable
        Read in the reader thread (a generator's body runs there).
    compute : callable
        Run in the calling thread on each item, in order.
    write : callable
        Run in the writer thread on each computed item, in order.
    prefetch : int
        Items the reader may hold ahead of ``compute``, and computed items that may wait for
        ``write`` (at least 1).
    writes_allowed : threading.Event, optional
        The writer waits for this event before its first ``write`` (``source`` can set it, e.g.
        once it has checked every input). If the run fails before it is set, nothing is
        written.

    Raises
    ------
    Exception
        The first exception of ``source``, ``compute`` or ``write``, re-raised here once the
        threads have ended. After an error of ``source`` or ``compute`` the items computed
        before it are still written (when writing is allowed); after an error of ``write``
        nothing more is written. ``KeyboardInterrupt`` stops both threads at once.
    ValueError
        If ``prefetch`` is below 1.

    Example
    -------
    >>> written = []
    >>> run_overlapped(range(5), lambda n: n * n, written.append, prefetch=2)
    >>> written
    [0, 1, 4, 9, 16]
    """
    if prefetch < 1:
        raise ValueError(f"prefetch must be at least 1; got {prefetch}")
    inputs: queue.Queue = queue.Queue(maxsize=prefetch)
    outputs: queue.Queue = queue.Queue(maxsize=prefetch)
    stop_reading = threading.Event()  # the caller needs no more items
    stop_writing = threading.Event()  # drop what is queued for writing
    write_failed = threading.Event()
    errors: dict[str, BaseException] = {}
    gate = threading.Event() if writes_allowed is None else writes_allowed

    def reader() -> None:
        try:
            for item in source:
                _put(inputs, (True, item), stop_reading)
            gate.set()  # every item was read: nothing is left to check
            _put(inputs, (True, _END), stop_reading)
        except _Stopped:
            pass
        except BaseException as error:  # handed to the caller, raised there
            try:
                _put(inputs, (False, error), stop_reading)
            except _Stopped:
                pass
        finally:
            close = getattr(source, "close", None)
            if callable(close):
                close()

    def writer() -> None:
        try:
            while not gate.wait(_POLL_SECONDS):
                if stop_writing.is_set():
                    return
            while (computed := _get(outputs, stop_writing)) is not _END:
                write(computed)
        except _Stopped:
            pass
        except BaseException as error:
            errors["write"] = error
            write_failed.set()

    if writes_allowed is None:
        gate.set()
    threads = [
        threading.Thread(target=reader, name="tdfusion-read", daemon=True),
        threading.Thread(target=writer, name="tdfusion-write", daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        while True:
            fine, item = _get(inputs, write_failed)
            if not fine:
                raise item
            if item is _END:
                break
            _put(outputs, compute(item), write_failed)
    except _Stopped:
        pass  # the writer failed; its error is raised below
    except Exception as error:
        errors["run"] = error
        if not gate.is_set():  # not every input was checked: write nothing
            stop_writing.set()
    except BaseException:  # KeyboardInterrupt, SystemExit: stop at once
        stop_writing.set()
        raise
    finally:
        stop_reading.set()
        if not stop_writing.is_set():
            try:  # the writer ends after what was computed before the end or an error
                _put(outputs, _END, write_failed)
            except _Stopped:
                pass
        try:
            for thread in threads:
                thread.join()
        except BaseException:  # interrupted while waiting: stop writing, then wait
            stop_writing.set()
            for thread in threads:
                thread.join()
            raise
    if "write" in errors:
        raise errors["write"]
    if "run" in errors:
        raise errors["run"]
