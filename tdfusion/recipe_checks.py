"""The checks of a recipe's settings: types, ranges, choices and how they go together.

:meth:`tdfusion.recipes.Recipe.validate` raises the first problem :func:`recipe_problem`
finds; a problem is one line naming the setting, its value and what it may be.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from tdfusion.recipe_tables import DATASETS, TASKS

if TYPE_CHECKING:  # pragma: no cover
    from tdfusion.recipes import Recipe

__all__ = ["field_types", "recipe_problem", "unknown_settings_message"]


def recipe_problem(recipe: Recipe, presets: Mapping[str, Any]) -> str | None:
    """The first problem of ``recipe``'s settings, or ``None`` when they are valid.

    Parameters
    ----------
    recipe : Recipe
        The recipe.
    presets : mapping
        The preset names ``recipe.preset`` may take (:data:`tdfusion.recipes.PRESETS`).

    Returns
    -------
    str or None
        One line naming the setting, its value and what it may be.

    Example
    -------
    >>> from tdfusion.recipes import PRESETS, RECIPES
    >>> recipe_problem(RECIPES["msrs-segmentation"], PRESETS) is None
    True
    """
    choices = _choices(presets)
    hints = field_types(type(recipe))
    for field in dataclasses.fields(recipe):
        problem = _setting_problem(
            field.name, getattr(recipe, field.name), hints[field.name], choices.get(field.name)
        )
        if problem is not None:
            return problem
    return _combination_problem(recipe)


_POSITIVE = (
    "epochs",
    "batch_size",
    "stride",
    "step_size",
    "fusion_steps",
    "fusion_crop",
    "data_crop",
)
_NON_NEGATIVE = ("meta_steps", "num_workers", "num_classes")
_POSITIVE_FLOATS = ("lr", "inner_lr", "generator_lr", "gamma")
_NON_NEGATIVE_FLOATS = ("alpha", "blur_augment", "noise_augment")


@functools.cache
def field_types(recipe_class: type) -> dict[str, Any]:
    """The resolved annotation of every field of ``recipe_class``.

    Parameters
    ----------
    recipe_class : type
        :class:`~tdfusion.recipes.Recipe`.

    Returns
    -------
    dict of str to type
        Field name -> annotation.
    """
    return typing.get_type_hints(recipe_class)


def unknown_settings_message(unknown: Iterable[str], recipe_class: type) -> str:
    """The error for setting names a :class:`Recipe` does not have: the names, the closest
    known name of each and, unless each has one, the known names.

    Parameters
    ----------
    unknown : iterable of str
        The names that are not fields of :class:`~tdfusion.recipes.Recipe`.
    recipe_class : type
        :class:`~tdfusion.recipes.Recipe`.

    Returns
    -------
    str
        One line.

    Example
    -------
    >>> from tdfusion.recipes import Recipe
    >>> unknown_settings_message(["epoch"], Recipe)
    "unknown recipe settings: ['epoch'] (did you mean 'epochs'?)"
    """
    known = [field.name for field in dataclasses.fields(recipe_class)]
    names = sorted(str(name) for name in unknown)
    guesses = [
        repr(match[0]) for name in names if (match := difflib.get_close_matches(name, known, 1))
    ]
    message = f"unknown recipe settings: {names}"
    if guesses:
        message += f" (did you mean {', '.join(guesses)}?)"
    if len(guesses) < len(names):
        message += f"; the settings are {', '.join(sorted(known))}"
    return message


def _choices(presets: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """The allowed values of every setting that is a name."""
    from tdfusion.inference.acceleration import PRECISIONS
    from tdfusion.nets.fixed_weights import FixedLossWeights
    from tdfusion.trainer.options import (
        FUSION_STEP_ORDERS,
        GENERATOR_OPTIMIZERS,
        TASK_INNER_OPTIMIZERS,
    )

    return {
        "dataset": tuple(DATASETS),
        "task": tuple(TASKS),
        "generator_update": tuple(GENERATOR_OPTIMIZERS),
        "loss_weights": ("learned", *FixedLossWeights.rules),
        "weighting": ("linear", "squared"),
        "task_inner_optimizer": tuple(TASK_INNER_OPTIMIZERS),
        "fusion_step_order": tuple(FUSION_STEP_ORDERS),
        "label_resolution": ("task", "full"),
        "preset": tuple(presets),
        "precision": tuple(PRECISIONS),
    }


def _type_problem(value: Any, annotation: Any) -> str | None:
    """What ``value`` should be to fit ``annotation`` (a :class:`Recipe` field's), or None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None:
            return None
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        problem = _type_problem(value, annotation)
        return None if problem is None else f"{problem} or null"
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is int:
        return None if type(value) is int else "an integer"
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None if math.isfinite(value) else "a finite number"
        return "a number"
    if annotation is str:
        return None if isinstance(value, str) else "a string"
    if typing.get_origin(annotation) is tuple:  # task_size: (int, int)
        length = len(typing.get_args(annotation))
        if (
            isinstance(value, (tuple, list))
            and len(value) == length
            and all(type(item) is int for item in value)
        ):
            return None
        return f"a list of {length} integers"
    raise TypeError(f"no check for recipe settings of type {annotation!r}")  # pragma: no cover


def _setting_problem(
    key: str, value: Any, annotation: Any, choices: tuple[str, ...] | None = None
) -> str | None:
    """Why ``value`` cannot be the setting ``key`` (naming both and what it may be), or None;
    ``choices``: the values allowed, for a setting that is a name."""
    expected = _type_problem(value, annotation)
    if expected is None:
        if choices is not None and value not in choices:
            expected = f"one of {', '.join(map(repr, choices))}"
        elif value is None:
            return None
        elif key in _POSITIVE and value < 1:
            expected = "at least 1"
        elif key in _NON_NEGATIVE and value < 0:
            expected = "at least 0"
        elif key in _POSITIVE_FLOATS and not value > 0:
            expected = "above 0"
        elif key in _NON_NEGATIVE_FLOATS and not value >= 0:
            expected = "at least 0"
        elif key == "exposure_low" and not 0 < value <= 1:
            expected = "in (0, 1]"
        elif key == "exposure_p" and not 0 <= value <= 1:
            expected = "in [0, 1]"
        elif key == "exposure_gamma" and not value >= 1:
            expected = "at least 1"
        elif key == "task_size" and min(value) < 1:
            expected = "two sizes of at least 1 (height, width)"
        else:
            return None
    shown = json.dumps(value) if isinstance(value, (list, tuple)) else repr(value)
    return f"{key} must be {expected}, got {shown}"


def _combination_problem(recipe: Recipe) -> str | None:
    """Why ``recipe``'s settings do not go together, or None (each is valid on its own)."""
    from tdfusion.data.layouts import LAYOUTS

    if recipe.loss_weights != "learned" and recipe.meta_steps:
        return (
            f"fixed loss weights (loss_weights {recipe.loss_weights!r}) cannot be learned: "
            f"meta_steps must be 0, got {recipe.meta_steps}"
        )
    if recipe.task != "none" and recipe.num_classes < 1:
        return f"task {recipe.task!r} needs num_classes of at least 1, got {recipe.num_classes}"
    layout = LAYOUTS.get(recipe.dataset)
    if layout is not None and recipe.task != "none" and recipe.task not in layout.labels:
        tasks = ", ".join(map(repr, ["none", *layout.labels]))
        return (
            f"dataset {recipe.dataset!r} has no {recipe.task} labels: task must be one of "
            f"{tasks}, got {recipe.task!r}"
        )
    if recipe.fusion_crop is not None and recipe.data_crop is not None:
        if recipe.fusion_crop > recipe.data_crop:
            return (
                f"fusion_crop must be at most data_crop ({recipe.data_crop}, the size of the "
                f"pairs read), got {recipe.fusion_crop}"
            )
    return None
