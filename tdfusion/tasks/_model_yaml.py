"""Reading an ultralytics model yaml without running any of it.

ultralytics builds a model from its yaml with ``eval`` of the ``activation:`` field and a lookup of
each layer's module name among everything its ``tasks`` module imports, so a yaml can run code.
:func:`load_model_config` reads the yaml with a safe loader (plain data only), checks every layer
against an allow-list (ultralytics' own layer classes and ``torch.nn`` layers) and every
argument for plain values, and turns the activation into a module itself; what reaches
ultralytics then holds nothing it would evaluate.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import numbers
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from tdfusion.errors import DataError

__all__ = ["ACTIVATIONS", "build_activation", "load_model_config", "model_activation"]

#: ``torch.nn`` activations a model yaml may name in ``activation:`` (as ``nn.Name(...)``).
ACTIVATIONS = frozenset(
    {
        "CELU",
        "ELU",
        "GELU",
        "Hardsigmoid",
        "Hardswish",
        "Hardtanh",
        "Identity",
        "LeakyReLU",
        "Mish",
        "PReLU",
        "ReLU",
        "ReLU6",
        "SELU",
        "SiLU",
        "Sigmoid",
        "Softplus",
        "Tanh",
    }
)
_YAML_SUFFIXES = (".yaml", ".yml")
_LARGEST_YAML = 1 << 20  # bytes; a model yaml is a few kilobytes


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, str, numbers.Real)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    return False


def build_activation(spec: str, where: str = "model yaml") -> nn.Module:
    """The activation module a yaml's ``activation:`` names, without evaluating the text.

    Parameters
    ----------
    spec : str
        ``nn.Name(literal, ...)`` or ``torch.nn.Name(...)`` with ``Name`` in :data:`ACTIVATIONS`
        and numbers, booleans or ``None`` as arguments.
    where : str
        The file, for the error message.

    Returns
    -------
    torch.nn.Module
        A new activation module.

    Raises
    ------
    DataError
        For anything else.

    Example
    -------
    >>> build_activation("nn.LeakyReLU(0.1)")
    LeakyReLU(negative_slope=0.1)
    """
    expected = (
        "expected nn.Name(...) with Name one of "
        f"{', '.join(sorted(ACTIVATIONS))} and numbers as arguments"
    )
    try:
        call = ast.parse(str(spec).strip(), mode="eval").body
    except (SyntaxError, ValueError):
        call = None
    name = None
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute):
        owner = ast.unparse(call.func.value)
        if owner in ("nn", "torch.nn"):
            name = call.func.attr
    if name not in ACTIVATIONS:
        raise DataError(f"{where}: activation {str(spec)[:80]!r} is not allowed; {expected}")
    try:
        args = [ast.literal_eval(argument) for argument in call.args]
        kwargs = {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords}
    except (ValueError, TypeError, SyntaxError, RecursionError):
        args, kwargs = [object()], {}
    if any(key is None for key in kwargs) or not all(
        value is None or isinstance(value, (bool, numbers.Real))
        for value in (*args, *kwargs.values())
    ):
        raise DataError(
            f"{where}: activation {str(spec)[:80]!r} is not allowed; its arguments must be numbers"
        )
    try:
        return getattr(nn, name)(*args, **kwargs)
    except (TypeError, ValueError) as error:
        raise DataError(f"{where}: activation {spec!r} cannot be built: {error}") from None


def _allowed_layers(layer_namespace: Mapping[str, Any]) -> frozenset[str]:
    names = set()
    for name, value in layer_namespace.items():
        if (
            isinstance(value, type)
            and issubclass(value, nn.Module)
            and value.__module__.startswith("ultralytics.nn.modules")
        ):
            names.add(name)
    return frozenset(names)


def _check_layer_name(module: Any, allowed: frozenset[str], where: str) -> None:
    if isinstance(module, str) and module.startswith("nn."):
        layer = getattr(nn, module[3:], None)
        if isinstance(layer, type) and issubclass(layer, nn.Module) and layer is not nn.Module:
            return
    elif isinstance(module, str) and module in allowed:
        return
    raise DataError(
        f"{where}: layer module {str(module)[:80]!r} is not allowed; expected one of "
        "ultralytics' layers (Conv, C2f, SPPF, Concat, Detect, ...) or a torch.nn layer "
        "(nn.Upsample, ...)"
    )


def check_model_config(
    config: Any, layer_namespace: Mapping[str, Any], where: str = "model yaml"
) -> dict:
    """Check a parsed model yaml: known layer modules and plain-value arguments only.

    Parameters
    ----------
    config : Any
        The parsed yaml.
    layer_namespace : mapping
        Where ultralytics looks layer names up (``vars(ultralytics.nn.tasks)``).
    where : str
        The file, for error messages.

    Returns
    -------
    dict
        A deep copy of ``config``.

    Raises
    ------
    DataError
        Naming the first field that is not allowed.
    """
    if not isinstance(config, Mapping):
        raise DataError(
            f"{where}: expected a mapping of model settings, got {type(config).__name__}"
        )
    config = copy.deepcopy(dict(config))
    allowed = _allowed_layers(layer_namespace)
    for section in ("backbone", "head"):
        layers = config.get(section)
        if not isinstance(layers, list) or not layers:
            raise DataError(f"{where}: {section!r} must be a non-empty list of layers")
        for index, layer in enumerate(layers):
            at = f"{where}: {section} layer {index}"
            if not isinstance(layer, list) or len(layer) != 4:
                raise DataError(f"{at} must be [from, repeats, module, args], got {layer!r:.80}")
            source, repeats, module, args = layer
            _check_layer_name(module, allowed, at)
            if not isinstance(args, list) or not _is_plain(args):
                raise DataError(f"{at}: the arguments must be a list of plain values")
            if not _is_plain(source) or isinstance(repeats, bool) or not isinstance(repeats, int):
                raise DataError(f"{at}: 'from' and the repeat count must be integers")
    for key, value in config.items():
        if key not in ("backbone", "head") and not (
            _is_plain(value)
            or (isinstance(value, Mapping) and all(_is_plain(v) for v in value.values()))
        ):
            raise DataError(f"{where}: {key!r} must hold plain values")
    return config


def load_model_config(model: str | os.PathLike[str] | Mapping, ultralytics: Any) -> dict:
    """Read and check a model yaml (a local file, a bundled name or a dict).

    Parameters
    ----------
    model : str, os.PathLike or mapping
        A local ``.yaml`` path, the name of a yaml bundled with ultralytics (``"yolov8n.yaml"``),
        or the parsed dict.
    ultralytics : Any
        :func:`~tdfusion.tasks._ultralytics.load_ultralytics`'s namespace.

    Returns
    -------
    dict
        The checked configuration, ``activation`` still as text (see :func:`model_activation`).

    Raises
    ------
    DataError
        For a file that cannot be read or a field that is not allowed.
    """
    namespace = vars(ultralytics.tasks)
    if isinstance(model, Mapping):
        return check_model_config(model, namespace, "model dict")
    text = os.fspath(model)
    path = Path(text)
    if "://" in text or path.suffix.lower() not in _YAML_SUFFIXES:
        raise DataError(
            f"model must be an ultralytics model yaml (a bundled name such as 'yolov8n.yaml' or a "
            f"local .yaml path) or its dict, got {text!r}; weights are never downloaded"
        )
    if path.is_file():
        import yaml

        if path.stat().st_size > _LARGEST_YAML:
            raise DataError(f"model yaml {path} is larger than {_LARGEST_YAML} bytes")
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            reason = " ".join(str(error).split())
            raise DataError(f"cannot read model yaml {path}: {reason}") from None
        config = check_model_config(config, namespace, f"model yaml {path}")
        config.setdefault("scale", ultralytics.tasks.guess_model_scale(path))
        config["yaml_file"] = str(path)
        return config
    if path.parent != Path("."):
        raise DataError(f"model yaml {path} does not exist")
    try:
        config = ultralytics.tasks.yaml_model_load(path)  # one of ultralytics' own files
    except (FileNotFoundError, OSError):
        raise DataError(
            f"model yaml {text!r} is neither a local file nor one bundled with ultralytics"
        ) from None
    return check_model_config(config, namespace, f"bundled model yaml {text}")


@contextlib.contextmanager
def model_activation(config: dict, conv_class: type, where: str = "model yaml") -> Iterator[dict]:
    """Build the yaml's activation and make it ``conv_class``'s default for a block.

    ultralytics would ``eval`` the ``activation`` text; instead it is built here by
    :func:`build_activation` and set as ``Conv.default_act`` while the model is built, and the
    yielded configuration has no ``activation`` left to evaluate.

    Parameters
    ----------
    config : dict
        A configuration from :func:`load_model_config`.
    conv_class : type
        ultralytics' ``Conv``.
    where : str
        The file, for error messages.

    Yields
    ------
    dict
        ``config`` without ``activation``.
    """
    config = dict(config)
    spec = config.pop("activation", None)
    if not spec:
        yield config
        return
    previous = conv_class.default_act
    conv_class.default_act = build_activation(spec, where)
    try:
        yield config
    finally:
        conv_class.default_act = previous
