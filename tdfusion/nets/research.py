"""The authors' research checkpoints: their key names, translated into this package's.

The research code wraps every convolution in a module that registers the same weight twice
(``X.weight`` and ``X.conv.weight``), names modules differently (``project_in_1``, ``FM``,
``encoder3``, ...) and saves through DataParallel (``module.`` prefix). Like timm's
``checkpoint_filter_fn``, the translation lives in one place, next to the networks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from tdfusion.errors import CheckpointError

__all__ = ["convert_research_state_dict", "is_research_state_dict", "strip_wrapper_prefix"]

#: Top-level module names of the research code -> ours (fusion network and loss generator).
_RESEARCH_TOP_LEVEL = {
    "project_in_1": "embed_a",
    "project_in_2": "embed_b",
    "patch_embed1": "embed_a",
    "patch_embed2": "embed_b",
    "encoder1": "encoder_a",
    "encoder2": "encoder_b",
    "encoder3": "decoder",
    "FM": "fusion",
    "project_out_0": "head_conv",
    "project_out_1": "head_out",
    "out1": "head_conv",
    "out2": "head_act",
    "out3": "head_out",
}

#: Names inside the research fusion block (``FM``) -> ours (:class:`CrossAttentionFusion`).
_RESEARCH_FUSION_BLOCK = {
    "temperature1": "temperature_a",
    "temperature2": "temperature_b",
    "qkv1": "qkv_a",
    "qkv1_dwconv": "qkv_dwconv_a",
    "qkv2": "qkv_b",
    "qkv2_dwconv": "qkv_dwconv_b",
    "project_mid1": "attn_project_a",
    "project_mid2": "attn_project_b",
    "project_E": "gate_in",
    "project_E_d": "gate_dwconv",
    "project_E1": "expand_a",
    "project_E1_d": "expand_dwconv_a",
    "project_E2": "expand_b",
    "project_E2_d": "expand_dwconv_b",
    "project_out1": "project_out_a",
    "project_out2": "project_out_b",
}

#: Layer-norm names inside a research transformer block -> ours (:class:`RestormerBlock`).
_RESEARCH_BLOCK_NORMS = {".norm1.body.": ".attn_norm.", ".norm2.body.": ".ffn_norm."}

#: Key prefixes of DataParallel / DistributedDataParallel and of torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_WRAPPED_CONV_KEY = re.compile(r"^(?P<owner>.+)\.conv\.(?P<leaf>weight|bias)$")


def strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the prefixes that wrappers put on every key.

    ``nn.DataParallel`` / DDP add ``module.``, ``torch.compile`` adds ``_orig_mod.``; nested
    wrappers add several.

    Parameters
    ----------
    state_dict : Mapping[str, torch.Tensor]
        A state dict.

    Returns
    -------
    dict[str, torch.Tensor]
        The same tensors; keys without a prefix that every key had.

    Example
    -------
    >>> list(strip_wrapper_prefix({"module._orig_mod.x.weight": torch.zeros(1)}))
    ['x.weight']
    """
    stripped = dict(state_dict)
    shared = _shared_wrapper_prefix(stripped)
    while shared:
        stripped = {key[len(shared) :]: value for key, value in stripped.items()}
        shared = _shared_wrapper_prefix(stripped)
    return stripped


def _shared_wrapper_prefix(state_dict: Mapping[str, Any]) -> str | None:
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            return prefix
    return None


def is_research_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """Whether a state dict uses the authors' research-code names.

    Parameters
    ----------
    state_dict : Mapping[str, Any]
        A state dict, with or without the ``module.`` prefix.

    Returns
    -------
    bool
        True when a top-level name of the research code (``project_in_1``, ``FM``,
        ``patch_embed1``, ...) or a wrapped convolution key (``X.conv.weight``) appears.

    Example
    -------
    >>> is_research_state_dict({"project_in_1.weight": torch.zeros(1)})
    True
    """
    for key in strip_wrapper_prefix(state_dict):
        if key.split(".", 1)[0] in _RESEARCH_TOP_LEVEL or _WRAPPED_CONV_KEY.match(key):
            return True
    return False


def _rename_research_key(key: str) -> str:
    parts = key.split(".")
    top = parts[0]
    if top == "FM" and len(parts) > 1:
        parts[1] = _RESEARCH_FUSION_BLOCK.get(parts[1], parts[1])
    parts[0] = _RESEARCH_TOP_LEVEL.get(top, top)
    renamed = ".".join(parts)
    for research_name, our_name in _RESEARCH_BLOCK_NORMS.items():
        renamed = renamed.replace(research_name, our_name)
    return renamed


def convert_research_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate a state dict of the authors' research code into this package's names.

    The research code wraps every convolution in a module that registers the same weight
    twice, so its state dicts hold ``X.weight`` and ``X.conv.weight``; the two must be
    equal (the file is refused otherwise) and one is kept. Layer norms lose their ``.body``
    level, DataParallel's ``module.`` prefix is dropped, and module names are mapped
    (``project_in_1`` -> ``embed_a``, ``FM.qkv1`` -> ``fusion.qkv_a``, ``encoder3`` of the
    loss generator -> ``decoder``, ...). Keys the mapping does not know are passed through
    unchanged, so loading reports them as unexpected.

    Parameters
    ----------
    state_dict : Mapping[str, torch.Tensor]
        A research ``ReFusion`` (fusion network) or ``LPN`` (loss generator) state dict.

    Returns
    -------
    dict[str, torch.Tensor]
        A state dict for :class:`~tdfusion.nets.ReFusionNet` or
        :class:`~tdfusion.nets.LossGenerator`.

    Raises
    ------
    CheckpointError
        When ``X.weight`` and ``X.conv.weight`` differ.

    Example
    -------
    >>> weight = torch.ones(16, 1, 3, 3)
    >>> converted = convert_research_state_dict(
    ...     {"project_in_1.weight": weight, "project_in_1.conv.weight": weight}
    ... )
    >>> list(converted)
    ['embed_a.weight']
    """
    state_dict = strip_wrapper_prefix(state_dict)
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        wrapped = _WRAPPED_CONV_KEY.match(key)
        if wrapped:
            alias = f"{wrapped['owner']}.{wrapped['leaf']}"
            if alias in state_dict:
                if not _same_tensor_values(state_dict[alias], value):
                    raise CheckpointError(
                        f"research checkpoint lists {alias} and {key} with different values; "
                        "refusing to guess which one the network used"
                    )
                continue
            key = alias
        converted[_rename_research_key(key)] = value
    return converted


def _same_tensor_values(first: Any, second: Any) -> bool:
    if not (isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor)):
        return False
    return first.shape == second.shape and bool(torch.equal(first, second.to(first.device)))
