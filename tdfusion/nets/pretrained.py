"""Checkpoint reading, conversion and writing for the networks of :mod:`tdfusion.nets`.

Four kinds of file are understood:

- the authors' research checkpoints (ReFusion, TDFusion fusion networks and their loss
  generator): plain state dicts that list every convolution weight twice, ``X.weight`` and
  ``X.conv.weight``, possibly with DataParallel's ``module.`` prefix; they are translated by
  :func:`convert_research_state_dict`;
- files written by ``save_pretrained``: ``{"format": "tdfusion.nets", "version": 1, "arch",
  "config", "state_dict"}``, whose config rebuilds the exact architecture;
- plain state dicts of this package's networks (widths inferred from the tensor shapes);
- trainer checkpoints (``"format": "tdfusion.trainer"``), from which each network takes its
  own entry of ``"models"`` and ``"model_configs"``.

Nothing is ever downloaded: a checkpoint is a local file.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from tdfusion.errors import CheckpointError
from tdfusion.files import atomic_save
from tdfusion.nets.bundled import bundled_path
from tdfusion.nets.research import (
    convert_research_state_dict,
    is_research_state_dict,
    strip_wrapper_prefix,
)
from tdfusion.trainer.checkpoint import TRAINER_CHECKPOINT_FORMAT as TRAINER_FORMAT
from tdfusion.trainer.checkpoint import model_entry, read_weights_only

__all__ = [
    "NETS_FORMAT",
    "NETS_FORMAT_VERSION",
    "TRAINER_FORMAT",
    "PretrainedMixin",
    "checkpoint_search_paths",
    "convert_research_state_dict",
    "infer_config",
    "is_research_state_dict",
    "load_checked_state_dict",
    "load_pretrained",
    "read_checkpoint",
    "resolve_checkpoint_path",
    "save_pretrained",
    "strip_wrapper_prefix",
]

#: Value of the ``"format"`` key of the files ``save_pretrained`` writes (and their version);
#: trainer checkpoints are ``TRAINER_FORMAT``, owned by :mod:`tdfusion.trainer.checkpoint`.
NETS_FORMAT = "tdfusion.nets"
NETS_FORMAT_VERSION = 1

#: How many key names an error message lists before saying "and N more".
_KEYS_SHOWN = 5

_NetT = TypeVar("_NetT", bound=nn.Module)


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:_KEYS_SHOWN])
    more = len(keys) - _KEYS_SHOWN
    return f"{shown} (and {more} more)" if more > 0 else shown


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read the architecture hyper-parameters of a network from its tensor shapes.

    Works for :class:`~tdfusion.nets.ReFusionNet` and :class:`~tdfusion.nets.LossGenerator`
    (both start with ``embed_a`` and ``encoder_a`` blocks). Whatever cannot be read is left
    out, so the constructor's default applies and a strict load reports the mismatch.
    ``ffn_expansion`` is a value that gives every block's feed-forward width (``dim`` wide in
    the encoders, ``2 * dim`` in the decoder), not necessarily the one the network was built
    with. A network without attention (a LossGenerator with ``num_blocks = 0``) gets
    ``gcd(dim, 8)`` heads, which divides ``dim``; heads do not change its output.

    Parameters
    ----------
    state_dict : Mapping[str, torch.Tensor]
        A state dict in this package's names.

    Returns
    -------
    dict[str, Any]
        Some of ``dim``, ``num_blocks``, ``num_heads``, ``ffn_expansion``, ``bias``.

    Example
    -------
    >>> infer_config({"embed_a.weight": torch.zeros(8, 1, 3, 3)})
    {'dim': 8, 'num_blocks': 0, 'num_heads': 8, 'bias': False}
    """
    config: dict[str, Any] = {}
    embed = state_dict.get("embed_a.weight")
    if not isinstance(embed, torch.Tensor) or embed.dim() != 4:
        return config
    dim = int(embed.shape[0])
    config["dim"] = dim
    # (stage, block index, name in the block, key) of every Restormer block's tensor.
    blocks = sorted(
        (match[1], int(match[2]), match[3], key)
        for key in state_dict
        if (match := re.match(r"^(encoder_a|encoder_b|decoder)\.(\d+)\.(.+)$", key)) is not None
    )
    config["num_blocks"] = max((block[1] + 1 for block in blocks), default=0)
    temperatures = [key for _, _, name, key in blocks if name == "attn.temperature"]
    num_heads = _heads_of(state_dict, [*temperatures, "fusion.temperature_a"])
    if num_heads is not None:
        config["num_heads"] = num_heads
    elif dim > 0:  # no attention at all: any divisor of dim builds the same network
        config["num_heads"] = math.gcd(dim, _NO_ATTENTION_MAX_HEADS)
    hidden_widths = {
        (dim * 2 if stage == "decoder" else dim, int(tensor.shape[0]) // 2)
        for stage, _, name, key in blocks
        if name == "ffn.project_in.weight"
        and isinstance(tensor := state_dict[key], torch.Tensor)
        and tensor.dim() == 4
    }
    expansion = _common_expansion(hidden_widths)
    if expansion is not None:
        config["ffn_expansion"] = expansion
    config["bias"] = "embed_a.bias" in state_dict
    return config


#: The networks' default number of heads; a network whose state dict holds no attention gets
#: ``gcd(dim, 8)`` (the default whenever ``dim`` allows it).
_NO_ATTENTION_MAX_HEADS = 8


def _heads_of(state_dict: Mapping[str, torch.Tensor], names: list[str]) -> int | None:
    # The rows of the first (heads, 1, 1) temperature among ``names``.
    for name in names:
        temperature = state_dict.get(name)
        if isinstance(temperature, torch.Tensor) and temperature.dim() == 3:
            return int(temperature.shape[0])
    return None


def _common_expansion(hidden_widths: Collection[tuple[int, int]]) -> float | None:
    # A factor e with int(width * e) == hidden for every (width, hidden): one inside the
    # intersection of the intervals [hidden / width, (hidden + 1) / width); the exact ratio
    # when it works (2.0 stays 2.0), else the middle. None when there is none.
    if not hidden_widths or any(width <= 0 for width, _ in hidden_widths):
        return None
    low = max(hidden / width for width, hidden in hidden_widths)
    high = min((hidden + 1) / width for width, hidden in hidden_widths)
    for candidate in (low, (low + high) / 2):
        if low <= candidate < high and all(
            int(width * candidate) == hidden for width, hidden in hidden_widths
        ):
            return candidate
    return None


def checkpoint_search_paths(name: str | os.PathLike[str]) -> list[Path]:
    """Where a checkpoint is looked for, in order.

    Parameters
    ----------
    name : str or os.PathLike
        The path the user gave.

    Returns
    -------
    list[Path]
        The path itself, then ``$TDFUSION_HOME/weights/<file name>`` (when the variable is
        set) and ``~/.cache/tdfusion/weights/<file name>``.

    Example
    -------
    >>> checkpoint_search_paths("ReFusion_IVIF.pth")[0]
    PosixPath('ReFusion_IVIF.pth')
    """
    given = Path(name).expanduser()
    candidates = [given]
    home = os.environ.get("TDFUSION_HOME")
    if home:
        candidates.append(Path(home).expanduser() / "weights" / given.name)
    candidates.append(Path.home() / ".cache" / "tdfusion" / "weights" / given.name)
    return candidates


def resolve_checkpoint_path(name: str | os.PathLike[str]) -> Path:
    """Find a checkpoint file on disk (see :func:`checkpoint_search_paths`).

    Parameters
    ----------
    name : str or os.PathLike
        A path, the file name of a checkpoint kept in a weights folder, or the name of
        bundled weights (:func:`~tdfusion.nets.list_pretrained`; a file of that name in the
        working directory takes precedence).

    Returns
    -------
    Path
        The first existing file.

    Raises
    ------
    FileNotFoundError
        Listing every place looked at, or saying that ``name`` is a folder, not a checkpoint
        file; nothing is downloaded.

    Example
    -------
    >>> resolve_checkpoint_path("weights/ReFusion_IVIF.pth")  # doctest: +SKIP
    PosixPath('weights/ReFusion_IVIF.pth')
    """
    bundled = bundled_path(os.fspath(name))
    if bundled is not None and not Path(name).is_file():  # a folder of that name is no file
        if not bundled.is_file():
            raise FileNotFoundError(
                f"the bundled weights {os.fspath(name)!r} are missing from this installation "
                f"({bundled}); reinstall tdfusion"
            )
        return bundled
    candidates = checkpoint_search_paths(name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if candidates[0].is_dir():
        raise FileNotFoundError(
            f"checkpoint {os.fspath(name)!r} is a folder, not a checkpoint file; pass the path "
            "of a weights file (.pt or .pth)"
        )
    looked = ", ".join(str(candidate) for candidate in candidates)
    raise FileNotFoundError(
        f"checkpoint {os.fspath(name)!r} not found; looked in: {looked}. tdfusion downloads "
        "nothing automatically: pass the path of a local file (or put it in "
        "$TDFUSION_HOME/weights/)"
    )


def _as_state_dict(candidate: Any, file: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(candidate, Mapping) or not candidate:
        raise CheckpointError(f"checkpoint {file}: {what} is not a non-empty state dict")
    not_tensors = [
        str(key) for key, value in candidate.items() if not isinstance(value, torch.Tensor)
    ]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint {file}: {what} holds entries that are not tensors: {_preview(not_tensors)}"
        )
    return dict(candidate)


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    arch: str,
    role: str,
    map_location: Any = "cpu",
    arch_aliases: Collection[str] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, Path]:
    """Read the state dict (in this package's names) and config of one network from a file.

    Parameters
    ----------
    path : str or os.PathLike
        Checkpoint path or file name (see :func:`resolve_checkpoint_path`).
    arch : str
        Registry name of the network that will load it (``"refusion"``, ...); files written
        for another architecture are refused.
    role : str
        Entry of a trainer checkpoint's ``"models"`` to take (``"fusion_model"`` or
        ``"loss_generator"``).
    map_location : Any
        Passed to :func:`torch.load` (the research files were saved on CUDA).
    arch_aliases : Collection[str]
        Other names accepted for the architecture (the class name, for instance).

    Returns
    -------
    state_dict : dict[str, torch.Tensor]
        Converted to this package's names.
    config : dict or None
        Constructor keyword arguments stored in the file, None when it holds none.
    file : Path
        The file that was read.

    Raises
    ------
    FileNotFoundError
        When no file is found.
    CheckpointError
        When the file is not a checkpoint of a known kind or holds another architecture.

    Example
    -------
    >>> state_dict, config, file = read_checkpoint(
    ...     "ReFusion_IVIF.pth", arch="refusion", role="fusion_model"
    ... )  # doctest: +SKIP
    """
    file = resolve_checkpoint_path(path)
    payload = read_weights_only(file, map_location)
    accepted = {arch, *arch_aliases}
    config: dict[str, Any] | None = None
    if isinstance(payload, Mapping) and payload.get("format") == NETS_FORMAT:
        version = payload.get("version")
        if version != NETS_FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {file} has {NETS_FORMAT!r} version {version!r}; this tdfusion "
                f"reads version {NETS_FORMAT_VERSION}"
            )
        stored_arch = payload.get("arch")
        if stored_arch not in accepted:
            raise CheckpointError(
                f"checkpoint {file} holds a {stored_arch!r} network, not a {arch!r} one"
            )
        state_dict = _as_state_dict(payload.get("state_dict"), file, "'state_dict'")
        config = _as_config(payload.get("config"), file)
    elif isinstance(payload, Mapping) and payload.get("format") == TRAINER_FORMAT:
        entry, description = model_entry(payload, role, file)
        state_dict = _as_state_dict(entry, file, f"models[{role!r}]")
        if description is not None:
            if not isinstance(description, Mapping) or description.get("arch") not in accepted:
                stored_arch = (
                    description.get("arch") if isinstance(description, Mapping) else description
                )
                raise CheckpointError(
                    f"trainer checkpoint {file}: models[{role!r}] is a {stored_arch!r} "
                    f"network, not a {arch!r} one"
                )
            config = _as_config(description.get("config"), file)
    elif isinstance(payload, Mapping) and "format" in payload:
        raise CheckpointError(
            f"checkpoint {file} has unknown format {payload['format']!r}; expected "
            f"{NETS_FORMAT!r}, {TRAINER_FORMAT!r} or a plain state dict"
        )
    elif isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        state_dict = _as_state_dict(payload["state_dict"], file, "'state_dict'")
    elif isinstance(payload, Mapping):
        state_dict = _as_state_dict(payload, file, "the file")
    else:
        raise CheckpointError(
            f"checkpoint {file} holds a {type(payload).__name__}, not a state dict or a "
            "tdfusion checkpoint"
        )
    state_dict = strip_wrapper_prefix(state_dict)
    if is_research_state_dict(state_dict):
        try:
            state_dict = convert_research_state_dict(state_dict)
        except CheckpointError as error:
            raise CheckpointError(f"checkpoint {file}: {error}") from error
    return state_dict, config, file


def _as_config(config: Any, file: Path) -> dict[str, Any] | None:
    if config is None:
        return None
    if not isinstance(config, Mapping) or not all(isinstance(key, str) for key in config):
        raise CheckpointError(f"checkpoint {file}: 'config' is not a dict of keyword arguments")
    return dict(config)


def load_checked_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    file: str | os.PathLike[str],
    strict: bool = True,
) -> None:
    """Load a state dict into a model, with an actionable error when it does not fit.

    Parameters
    ----------
    model : nn.Module
        The network.
    state_dict : Mapping[str, torch.Tensor]
        In the model's names.
    file : str or os.PathLike
        Named in messages.
    strict : bool
        When True, missing or unexpected keys are an error; when False they are reported
        with a warning and the matching keys are loaded. Shape mismatches are always an error.

    Raises
    ------
    CheckpointError
        Naming the file, the first missing / unexpected keys, the shape mismatches, or the
        first tensor holding NaN or infinite values.

    Example
    -------
    >>> load_checked_state_dict(nn.Linear(2, 2), nn.Linear(2, 2).state_dict(), "x.pth")
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} in the file vs {tuple(value.shape)} in the model"
        for key, value in expected.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_preview(mismatched)}")
    owner = type(model).__name__
    for key, value in state_dict.items():
        if key in expected and value.is_floating_point() and not bool(value.isfinite().all()):
            bad = int((~value.isfinite()).sum())
            raise CheckpointError(
                f"checkpoint {file} holds NaN or infinite values ({bad} of {value.numel()} in "
                f"{key}); it cannot be used for {owner}"
            )
    if mismatched or (strict and problems):
        raise CheckpointError(f"checkpoint {file} does not fit {owner}: " + "; ".join(problems))
    if problems:
        warnings.warn(
            f"checkpoint {file} loaded into {owner} non-strictly: " + "; ".join(problems),
            stacklevel=3,
        )
    loadable = {key: value for key, value in state_dict.items() if key in expected}
    model.load_state_dict(loadable, strict=False)


def load_pretrained(
    model: _NetT,
    path: str | os.PathLike[str],
    map_location: Any = "cpu",
    strict: bool = True,
) -> _NetT:
    """Load a checkpoint into an existing network (its architecture is kept as built).

    Parameters
    ----------
    model : nn.Module
        A network with ``arch`` and ``trainer_role`` attributes
        (:class:`~tdfusion.nets.ReFusionNet`, :class:`~tdfusion.nets.LossGenerator`).
    path : str or os.PathLike
        Any checkpoint :func:`read_checkpoint` understands.
    map_location : Any
        Passed to :func:`torch.load`.
    strict : bool
        See :func:`load_checked_state_dict`.

    Returns
    -------
    nn.Module
        ``model``, with the weights loaded.

    Example
    -------
    >>> from tdfusion.nets import ReFusionNet
    >>> net = load_pretrained(ReFusionNet(), "ReFusion_IVIF.pth")  # doctest: +SKIP
    """
    state_dict, _, file = read_checkpoint(
        path,
        arch=getattr(model, "arch", type(model).__name__),
        role=getattr(model, "trainer_role", "fusion_model"),
        map_location=map_location,
        arch_aliases=_class_names(type(model)),
    )
    load_checked_state_dict(model, state_dict, file, strict)
    return model


def _class_names(cls: type) -> tuple[str, str]:
    # Trainer checkpoints may describe a network by its class rather than its registry name.
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def save_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write a network, its architecture name and its config to one file, atomically.

    The file holds ``{"format": "tdfusion.nets", "version": 1, "arch", "config",
    "state_dict"}``; it is written to a temporary file in the same folder and renamed, so a
    crash never leaves half a checkpoint behind.

    Parameters
    ----------
    model : nn.Module
        A network with ``arch`` and ``config``.
    path : str or os.PathLike
        Destination; missing parent folders are created.

    Returns
    -------
    Path
        The file written.

    Example
    -------
    >>> from tdfusion.nets import ReFusionNet
    >>> save_pretrained(ReFusionNet(dim=8), "fusion.pth")
    PosixPath('fusion.pth')
    """
    destination = Path(path).expanduser()
    destination.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": NETS_FORMAT,
        "version": NETS_FORMAT_VERSION,
        "arch": model.arch,
        "config": dict(model.config),
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
    }
    return atomic_save(payload, destination)


class PretrainedMixin:
    """Adds ``from_pretrained`` / ``save_pretrained`` to an ``nn.Module`` network.

    A network using it defines ``arch`` (its registry name), ``trainer_role`` (its
    entry in trainer checkpoints) and a ``config`` property returning its constructor
    keyword arguments.

    Example
    -------
    >>> from tdfusion.nets import ReFusionNet
    >>> path = ReFusionNet(dim=8).save_pretrained("fusion.pth")
    >>> ReFusionNet.from_pretrained(path).config["dim"]
    8
    """

    arch: ClassVar[str]
    trainer_role: ClassVar[str]

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this architecture."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(
        cls: type[_NetT],
        path: str | os.PathLike[str],
        map_location: Any = "cpu",
        strict: bool = True,
    ) -> _NetT:
        """Build the network from a checkpoint file, in eval mode.

        Parameters
        ----------
        path : str or os.PathLike
            The name of bundled weights (``"tdfusion-ivif"``, see
            :func:`~tdfusion.nets.list_pretrained`), a ``save_pretrained`` file, a plain
            state dict of this network, a trainer checkpoint (its entry for this network),
            or one of the authors' research checkpoints (``ReFusion_IVIF.pth``,
            ``TDFusion_MSRS.pth``, ...). When the path
            does not exist, the file name is looked up in ``$TDFUSION_HOME/weights/`` and
            ``~/.cache/tdfusion/weights/``; nothing is downloaded.
        map_location : Any
            Passed to :func:`torch.load`; keep ``"cpu"`` (the default) for the research
            files, which were saved on CUDA, and move the network afterwards.
        strict : bool
            When True (the default), missing or unexpected keys are an error.

        Returns
        -------
        nn.Module
            The network, with the architecture stored in (or inferred from) the file.

        Raises
        ------
        FileNotFoundError
            When the file is not found, or ``path`` is a folder.
        CheckpointError
            When the file is unreadable, of an unknown kind, for another architecture, or
            its keys or shapes do not fit (the message names them).
        """
        state_dict, config, file = read_checkpoint(
            path,
            arch=cls.arch,  # type: ignore[attr-defined]
            role=cls.trainer_role,  # type: ignore[attr-defined]
            map_location=map_location,
            arch_aliases=_class_names(cls),
        )
        if config is None:
            config = infer_config(state_dict)
        try:
            model = cls(**config)
        except (TypeError, ValueError) as error:
            raise CheckpointError(
                f"checkpoint {file}: config {config} does not build a {cls.__name__}: {error}"
            ) from error
        load_checked_state_dict(model, state_dict, file, strict)
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write this network to ``path`` (see :func:`save_pretrained`).

        Parameters
        ----------
        path : str or os.PathLike
            Destination file.

        Returns
        -------
        Path
            The file written.
        """
        return save_pretrained(self, path)  # type: ignore[arg-type]
