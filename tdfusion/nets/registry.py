"""Model registry and factory: build a network of :mod:`tdfusion.nets` by name."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from tdfusion.nets.bundled import default_pretrained
from tdfusion.nets.pretrained import load_pretrained

__all__ = ["create_model", "list_models", "register_model"]

_ModelFactory = Callable[..., nn.Module]
_FactoryT = TypeVar("_FactoryT", bound=_ModelFactory)

_MODEL_FACTORIES: dict[str, _ModelFactory] = {}


def register_model(name: str) -> Callable[[_FactoryT], _FactoryT]:
    """Class (or function) decorator that makes a network available to :func:`create_model`.

    Parameters
    ----------
    name : str
        Registry name; must not be taken by another factory.

    Returns
    -------
    Callable
        The decorator; it returns the decorated object unchanged.

    Raises
    ------
    ValueError
        When ``name`` is already registered to a different object.

    Example
    -------
    >>> @register_model("tiny_identity")  # doctest: +SKIP
    ... class TinyIdentity(nn.Module):
    ...     def forward(self, a, b):
    ...         return a
    """

    def decorator(factory: _FactoryT) -> _FactoryT:
        registered = _MODEL_FACTORIES.get(name)
        if registered is not None and registered is not factory:
            raise ValueError(f"model name {name!r} is already registered to {registered!r}")
        _MODEL_FACTORIES[name] = factory
        return factory

    return decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the registered networks, sorted.

    Parameters
    ----------
    pattern : str, optional
        Shell-style filter (``"refusion*"``).

    Returns
    -------
    list[str]
        The matching names.

    Example
    -------
    >>> list_models()
    ['loss_generator', 'refusion']
    """
    names = sorted(_MODEL_FACTORIES)
    return fnmatch.filter(names, pattern) if pattern else names


def create_model(
    name: str,
    pretrained: bool | str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered network, optionally with weights from a checkpoint.

    Parameters
    ----------
    name : str
        Registry name (see :func:`list_models`).
    pretrained : bool, str or os.PathLike, optional
        ``None`` or ``False``: fresh weights. ``True``: the architecture's bundled weights
        (``"tdfusion-ivif"`` for ``"refusion"``, see :func:`~tdfusion.nets.list_pretrained`),
        as in timm. A string or path: the checkpoint to load (a file, or the name of bundled
        weights). Without ``kwargs`` the architecture comes from the checkpoint
        (``from_pretrained``); with ``kwargs`` the network is built from them and the
        checkpoint must fit it.
    **kwargs
        Constructor arguments (``dim``, ``num_blocks``, ...).

    Returns
    -------
    nn.Module
        The network: in training mode when it has fresh weights, in eval mode when weights
        were loaded (as ``from_pretrained`` returns it), with or without ``kwargs``.

    Raises
    ------
    ValueError
        When ``name`` is unknown (the message lists the known names), or ``pretrained`` is
        True for an architecture without bundled weights.

    Example
    -------
    >>> net = create_model("refusion", dim=8)
    >>> net.config["dim"], net.training
    (8, True)
    >>> create_model("refusion", pretrained=True).training
    False
    """
    factory = _MODEL_FACTORIES.get(name)
    if factory is None:
        known = ", ".join(list_models()) or "none"
        raise ValueError(f"unknown model {name!r}; registered models: {known}")
    if pretrained is None or pretrained is False:
        return factory(**kwargs)
    if pretrained is True:
        pretrained = default_pretrained(name)
        if pretrained is None:
            raise ValueError(
                f"model {name!r} has no bundled weights for pretrained=True; pass the path "
                "of a checkpoint instead"
            )
    from_pretrained = getattr(factory, "from_pretrained", None)
    if not kwargs and from_pretrained is not None:
        model = from_pretrained(pretrained)
    else:
        model = load_pretrained(factory(**kwargs), pretrained)
    return model.eval()
