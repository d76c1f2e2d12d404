"""Progress bars that the ``TQDM_*`` environment variables (``TQDM_DISABLE=1``) still govern."""

from __future__ import annotations

__all__ = ["bar_options"]


def bar_options(progress: bool) -> dict[str, bool]:
    """Keyword arguments for a tqdm bar that is shown when ``progress`` is true.

    tqdm reads ``TQDM_DISABLE`` and the other ``TQDM_*`` variables as defaults of the arguments
    a caller leaves out; ``disable=False`` passed explicitly would override them. So a bar that
    is on passes nothing, and ``TQDM_DISABLE=1`` still hides it.

    Parameters
    ----------
    progress : bool
        Whether the caller wants the bar.

    Returns
    -------
    dict of str to bool
        ``{}`` when ``progress``, else ``{"disable": True}``.

    Example
    -------
    >>> bar_options(True), bar_options(False)
    ({}, {'disable': True})
    """
    return {} if progress else {"disable": True}
