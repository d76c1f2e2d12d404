"""The paper's training recipes (MSRS/FMB segmentation, M3FD/LLVIP detection) as reusable code.

A :class:`Recipe` holds every setting of one protocol; :func:`train` builds the dataset, the
task network, the trainer and the data loader from it and trains, resumably, into a folder.
The command line (``tdfusion train``) and the examples are thin layers over this module.

Example
-------
>>> from tdfusion.recipes import RECIPES
>>> recipe = RECIPES["msrs-segmentation"].replace(epochs=1, meta_steps=2)
>>> recipe.task_size, recipe.num_classes
((240, 320), 9)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tdfusion.errors import DataError
from tdfusion.files import LOCK_NAME, missing_folders, output_lock, remove_unused_folders
from tdfusion.recipe_checks import field_types, recipe_problem, unknown_settings_message
from tdfusion.recipe_runs import (
    NothingToTrainWarning,
    _checkpoint_epoch,
    _recipe_changes,
    _recipe_file,
    _remove_earlier_run,
    _stopped_message,
)
from tdfusion.recipe_tables import DATASETS, TASKS, no_task, read_transform

__all__ = [
    "PRESETS",
    "RECIPES",
    "Recipe",
    "build_dataset",
    "build_task",
    "build_trainer",
    "load_recipe",
    "make_smoke_dataset",
    "no_task",
    "train",
]


@dataclass(frozen=True)
class Recipe:
    """One training protocol.

    :meth:`replace`, :func:`load_recipe`, :func:`build_dataset`, :func:`build_trainer` and
    :func:`train` check the settings with :meth:`validate`: a wrong type (``"false"`` for a
    boolean, ``"1"`` for an integer), a value out of range or an unknown name is refused with a
    :class:`~tdfusion.errors.DataError` naming the setting.

    Attributes
    ----------
    name : str
        Recipe name.
    dataset : {"msrs", "fmb", "m3fd", "llvip", "roadscene"}
        Dataset layout, a key of ``DATASETS`` (the layouts are described in
        :data:`tdfusion.data.layouts.LAYOUTS`; ``"roadscene"`` is two folders ``ir/`` and
        ``vi/`` of pairs matched by file stem).
    task : {"segmentation", "detection", "none"}
        Task network, a key of ``TASKS``: SegFormer (``encoder``) or YOLOv8 (``model``), from
        scratch; ``"none"`` trains the fusion network alone (fusion pre-training).
    num_classes : int
        Classes of the task (segmentation: including the background/unlabelled class).
    task_size : (int, int) or None
        Size the sources are resized to before they are fused for the task.
    fusion_crop : int or None
        Random crop for the fusion loss (``None``: the whole batch).
    epochs, meta_steps : int
        Epochs (L) and generator updates per epoch (M).
    batch_size : int
        Pairs per batch before the source swap (which doubles it).
    swap : bool
        Feed every batch in both source orders.
    lr, inner_lr, generator_lr : float
        Learning rates of F and T (Adam), of the inner step, and of the generator.
    generator_update : {"normalized", "optimizer"}
        Generator update rule (see :class:`~tdfusion.MetaFusionTrainer`).
    step_size, gamma : int, float
        StepLR schedule of every optimiser (the research code's 10 and 0.1).
    encoder, model : str
        SegFormer encoder and YOLO model yaml.
    seed : int
        Seed of the data order and crops.
    num_workers : int
        Data-loading processes.
    fusion_steps : int or None
        Cap on fusion steps per epoch (None: one full pass).
    stride : int
        Keep every ``stride``-th training pair (the paper's LLVIP protocol uses 10).
    loss_weights : {"learned", "equal", "max_intensity"}
        ``"learned"``: a :class:`~tdfusion.LossGenerator` trained by the meta steps (the
        method). ``"equal"`` / ``"max_intensity"``: a fixed
        :class:`~tdfusion.nets.FixedLossWeights` rule (then ``meta_steps`` must be 0).
    alpha : float
        Weight of the gradient term of the fusion loss (the paper's 1).
    data_crop : int or None
        Random crop (with random flips) applied to every training pair when it is read, so
        that pairs of different sizes form batches; ``None``: whole images.
    exposure_augment : bool
        Also darken each source of a cropped pair at random
        (:class:`~tdfusion.data.RandomExposure`), so that night scenes keep their black level.
    exposure_gamma : float
        Largest gamma of that darkening (1: a factor only; larger: mid-tones turn black).
    exposure_low : float
        Smallest factor of that darkening (the factor is drawn from ``[exposure_low, 1]``).
    exposure_p : float
        Probability of darkening each source.
    blur_augment : float
        Largest standard deviation (pixels) of a Gaussian blur of source ``a`` of a cropped
        pair, applied to half the pairs (:class:`~tdfusion.data.RandomBlur`): soft infrared
        images; 0: none.
    noise_augment : float
        Largest standard deviation (0-1 range) of Gaussian noise added to source ``b`` of a
        cropped pair after the darkening, for half the pairs
        (:class:`~tdfusion.data.RandomNoise`): grainy night visible images; 0: none.
    init_weights : str or None
        Fusion weights to start from (a name of :func:`~tdfusion.nets.list_pretrained`, a
        ``save_pretrained`` file or a trainer checkpoint); ``None``: a fresh network.
    weighting : {"linear", "squared"}
        How the weights enter the intensity loss: the paper's Eq. 2 (linear) or the research
        code's ``mse(w * (a - f), 0)`` (squared).
    task_inner_optimizer : str
        The task network's inner step ``T'`` (``task_inner_optimizer`` of
        :class:`~tdfusion.MetaFusionTrainer`): ``"sgd"``, ``"adam"``, ``"task_optimizer"`` or
        ``"task_optimizer_persistent"`` (the research code).
    fusion_step_order : {"simultaneous", "sequential"}
        Whether the fusion step feeds ``T`` with ``F`` before or after ``F``'s update.
    label_resolution : {"task", "full"}
        Segmentation: masks resized (nearest) to ``task_size`` and the cross-entropy taken there
        on padded inputs (``"task"``), or masks at the dataset's full size and the research
        code's cross-entropy (``"full"``: no padding, logits upsampled with
        ``align_corners=True``).
    preset : {"default", "research"}
        The preset of :data:`PRESETS` the recipe was built with; ``replace(preset=...)``
        applies one (the other changes given with it override it).
    precision : {"fp32", "bf16", "fp16"}
        Mixed precision of the networks' forwards (``precision`` of
        :class:`~tdfusion.MetaFusionTrainer`); ``"fp16"`` needs ``meta_steps=0``.
    compile : bool
        :func:`torch.compile` the fusion phase's forwards (uncompiled when that fails).
    channels_last : bool
        Networks and sources in channels-last memory order.
    grad_checkpointing : bool
        Checkpoint the blocks of ``F`` and ``G``
        (:meth:`~tdfusion.nets.ReFusionNet.set_grad_checkpointing`): the meta step's memory
        peak falls by about 42% (4.2 to 2.4 GiB in the paper's MSRS setting) for 1.12 times
        the time.
    """

    name: str
    dataset: str
    task: str
    num_classes: int
    task_size: tuple[int, int] | None
    fusion_crop: int | None = 256
    epochs: int = 50
    meta_steps: int = 200
    batch_size: int = 1
    swap: bool = True
    lr: float = 1e-4
    inner_lr: float = 1e-4
    generator_lr: float = 1e-4
    generator_update: str = "normalized"
    step_size: int = 10
    gamma: float = 0.1
    encoder: str = "mit_b0"
    model: str = "yolov8n.yaml"
    seed: int = 0
    num_workers: int = 0
    fusion_steps: int | None = None
    stride: int = 1
    loss_weights: str = "learned"
    alpha: float = 1.0
    data_crop: int | None = None
    exposure_augment: bool = False
    exposure_gamma: float = 1.0
    exposure_low: float = 0.25
    exposure_p: float = 0.5
    blur_augment: float = 0.0
    noise_augment: float = 0.0
    init_weights: str | None = None
    weighting: str = "linear"
    task_inner_optimizer: str = "sgd"
    fusion_step_order: str = "simultaneous"
    label_resolution: str = "task"
    preset: str = "default"
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    grad_checkpointing: bool = False

    def replace(self, **changes: Any) -> Recipe:
        """A copy with some settings changed, checked with :meth:`validate`.

        ``preset=NAME`` applies the settings of :data:`PRESETS` ``[NAME]`` first; the other
        changes given in the same call override them.

        Raises
        ------
        DataError
            For an unknown setting name, an unknown preset, or a copy that :meth:`validate`
            refuses (the message names the setting, its value and what it may be).

        Example
        -------
        >>> recipe = RECIPES["msrs-segmentation"].replace(preset="research", epochs=40)
        >>> recipe.weighting, recipe.task_inner_optimizer, recipe.epochs
        ('squared', 'task_optimizer_persistent', 40)
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise DataError(unknown_settings_message(unknown, type(self)))
        if "preset" in changes:
            preset = changes["preset"]
            if not isinstance(preset, str) or preset not in PRESETS:
                raise DataError(
                    f"recipe {self.name}: preset must be one of {', '.join(map(repr, PRESETS))}, "
                    f"got {preset!r}"
                )
            changes = {**PRESETS[preset], **changes}
        hints = field_types(type(self))
        for key, value in changes.items():
            if key == "task_size" and isinstance(value, list):
                changes[key] = tuple(value)  # a JSON list or the command line's two values
            elif hints[key] is float and type(value) is int:
                changes[key] = float(value)
        recipe = dataclasses.replace(self, **changes)
        recipe.validate()
        return recipe

    def validate(self) -> None:
        """Check every setting against its type, its range and the settings it goes with.

        Booleans must be ``True``/``False`` (JSON ``true``/``false``), integers must be
        integers (not booleans), floats finite numbers; ``epochs``, ``batch_size``,
        ``stride``, ``step_size`` and, where set, ``fusion_steps``, ``fusion_crop``,
        ``data_crop`` and the two ``task_size`` entries at least 1, ``meta_steps`` and
        ``num_workers`` at least 0, the learning rates and ``gamma`` above 0; the names
        (``dataset``, ``task``, ``loss_weights``, ``weighting``, ...) one of their choices; fixed
        ``loss_weights`` need ``meta_steps=0``; the task must be one the dataset has labels for
        (or ``"none"``); ``fusion_crop`` may not exceed ``data_crop``.

        Raises
        ------
        DataError
            For the first setting that fails, naming it, its value and what it may be.

        Example
        -------
        >>> RECIPES["msrs-segmentation"].validate()
        >>> dataclasses.replace(RECIPES["msrs-segmentation"], swap="false").validate()
        Traceback (most recent call last):
        ...
        tdfusion.errors.DataError: recipe msrs-segmentation: swap must be true or false, got 'false'
        """
        problem = recipe_problem(self, PRESETS)
        if problem is not None:
            name = self.name if isinstance(self.name, str) else repr(self.name)
            raise DataError(f"recipe {name}: {problem}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


#: Recipe settings by preset name. ``"default"`` is tdfusion's (the paper's equations);
#: ``"research"`` reproduces the authors' research code's meta and fusion steps: squared
#: weights, ``T'`` by one step of ``T``'s own Adam with its state kept, the cross-entropy at the
#: full label resolution without padding, and ``T`` fed with ``F`` after ``F``'s update in the
#: fusion step (the inner SGD step, the normalised generator update, the crops, the task size
#: and the swap are the same in both). See :doc:`/howto/paper_settings`.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "weighting": "linear",
        "task_inner_optimizer": "sgd",
        "fusion_step_order": "simultaneous",
        "label_resolution": "task",
        "generator_update": "normalized",
    },
    "research": {
        "weighting": "squared",
        "task_inner_optimizer": "task_optimizer_persistent",
        "fusion_step_order": "sequential",
        "label_resolution": "full",
        "generator_update": "normalized",
    },
}


#: The paper's protocols (Sec. 4.1 and the research code: batch 2 via the source swap,
#: 256x256 fusion crops, task inputs resized to the sizes below, Adam at 1e-4, StepLR 10/0.1).
RECIPES: dict[str, Recipe] = {
    "msrs-segmentation": Recipe("msrs-segmentation", "msrs", "segmentation", 9, (240, 320)),
    "fmb-segmentation": Recipe("fmb-segmentation", "fmb", "segmentation", 15, (300, 400)),
    "m3fd-detection": Recipe("m3fd-detection", "m3fd", "detection", 6, (192, 256)),
    "llvip-detection": Recipe("llvip-detection", "llvip", "detection", 1, (256, 320), stride=10),
}

#: The bundled "tdfusion-ivif" fusion weights, first stage: ReFusionNet under the fusion loss
#: with the fixed max-intensity weighting, no task, on the 221 RoadScene pairs (model card:
#: tdfusion/nets/weights/tdfusion_ivif.md).
_PRETRAIN = Recipe(
    "roadscene-pretrain",
    "roadscene",
    "none",
    0,
    None,
    fusion_crop=None,
    epochs=12,
    meta_steps=0,
    batch_size=8,
    swap=False,
    lr=1e-3,
    step_size=20,
    gamma=0.3,
    loss_weights="max_intensity",
    alpha=0.5,
    data_crop=128,
    exposure_augment=True,
)
RECIPES["roadscene-pretrain"] = _PRETRAIN


def _next_stage(previous: str, name: str, **changes: Any) -> Recipe:
    """Training stage ``name``: stage ``previous``'s recipe with ``changes``, started from the
    weights that ``previous`` writes when run with ``--out runs/<previous>``."""
    return RECIPES[previous].replace(
        name=name, init_weights=f"runs/{previous}/fusion_model.pt", **changes
    )


# Its second stage, from the first stage's weights: the intensity term weighs more (alpha 0.1)
# and the darkening includes a gamma, so that the fused image keeps the target's black and
# white levels (RoadScene's brighter source is rarely darker than 90 grey levels).
RECIPES["roadscene-finetune"] = _next_stage(
    "roadscene-pretrain",
    "roadscene-finetune",
    epochs=8,
    lr=3e-4,
    alpha=0.1,
    exposure_gamma=4.0,
    seed=1,
)
# Its third stage, from the second stage's weights: the same loss at a falling learning rate
# (1e-4, then 3e-5 after 5 epochs) on larger crops, which settles the fine texture the first
# two stages leave soft.
RECIPES["roadscene-refine"] = _next_stage(
    "roadscene-finetune",
    "roadscene-refine",
    epochs=10,
    lr=1e-4,
    step_size=5,
    gamma=0.3,
    data_crop=160,
    seed=2,
)
# Its fourth stage, from the third stage's weights: the gradient term weighs twice as much
# (alpha 0.2) at a constant learning rate of 1e-4 for 32 epochs, which carries more of the
# darker source's texture into the fused image. The bundled weights were trained as 8 epochs,
# resumed to 16, then to 32 (--epochs); each resume restarts the data order from the seed.
RECIPES["roadscene-sharpen"] = _next_stage(
    "roadscene-refine",
    "roadscene-sharpen",
    epochs=32,
    lr=1e-4,
    step_size=100,
    alpha=0.2,
    seed=3,
)
# Its fifth stage, from the fourth stage's weights: the same loss on pairs made to look like
# night scenes from large cameras. Half the infrared crops are blurred (sigma up to 3 pixels)
# and half the visible crops get noise (sigma up to 0.03) after the darkening: RoadScene's
# infrared carries more fine detail than its visible image, night pairs the other way round, and
# a network that only saw the former leaves the visible image's texture behind.
RECIPES["roadscene-night"] = _next_stage(
    "roadscene-sharpen",
    "roadscene-night",
    epochs=16,
    blur_augment=3.0,
    noise_augment=0.03,
    seed=5,
)
# Its sixth stage, from the fifth stage's weights: twice the noise (sigma up to 0.06) and a
# heavier gradient term (alpha 0.25), which carry more of the visible image's fine texture.
RECIPES["roadscene-grain"] = _next_stage(
    "roadscene-night",
    "roadscene-grain",
    epochs=8,
    alpha=0.25,
    noise_augment=0.06,
    seed=7,
)
# Its seventh and last stage, from the sixth stage's weights: the same loss and pairs at a
# learning rate of 3e-5, which settles the fine detail (the bundled weights).
RECIPES["roadscene-polish"] = _next_stage(
    "roadscene-grain",
    "roadscene-polish",
    epochs=6,
    lr=3e-5,
    seed=9,
)
# Its eighth stage, from the seventh stage's weights: noise up to 0.1 on half the visible crops,
# at the sixth stage's learning rate (1e-4); on night pairs the visible image's grain is the
# fine detail, and the network learns to carry it at full strength.
RECIPES["roadscene-noise"] = _next_stage(
    "roadscene-polish",
    "roadscene-noise",
    epochs=8,
    lr=1e-4,
    noise_augment=0.10,
    seed=11,
)
# Its ninth stage, from the eighth stage's weights: the same loss and pairs at 3e-5.
RECIPES["roadscene-settle"] = _next_stage(
    "roadscene-noise",
    "roadscene-settle",
    epochs=6,
    lr=3e-5,
    seed=13,
)
# Its tenth stage, from the ninth stage's weights: every source darkened, by a factor down to
# 0.1 (and the random gamma), at 3e-5. On dark scenes the fused image carried the visible
# image's detail at 0.79 to 0.86 of its contrast where the visible image is the brighter source
# and under 20 grey levels (MSRS night pairs): darker training crops bring it to 0.86-0.92.
RECIPES["roadscene-dark"] = _next_stage(
    "roadscene-settle",
    "roadscene-dark",
    epochs=8,
    exposure_low=0.1,
    exposure_p=1.0,
    seed=15,
)
# Its eleventh stage, from the tenth stage's weights: the same darkened pairs at 1e-4 for 6
# epochs, which moves the network further than 8 more epochs at 3e-5 did.
RECIPES["roadscene-dark-boost"] = _next_stage(
    "roadscene-dark",
    "roadscene-dark-boost",
    epochs=6,
    lr=1e-4,
    seed=19,
)
# Its twelfth and last stage, from the eleventh stage's weights: the same at 3e-5 (the bundled
# weights).
RECIPES["roadscene-dark-settle"] = _next_stage(
    "roadscene-dark-boost",
    "roadscene-dark-settle",
    lr=3e-5,
    seed=21,
)


def load_recipe(
    name: str | None = None, config: str | os.PathLike[str] | None = None, **overrides: Any
) -> Recipe:
    """A recipe by name, updated from a JSON file and keyword overrides (``None`` values ignored).

    Parameters
    ----------
    name : str, optional
        A key of :data:`RECIPES`; optional when the config file names one (``"name"``),
        which must then be the same.
    config : str or os.PathLike, optional
        JSON file of settings.
    **overrides
        Settings that replace the recipe's; ``preset="research"`` applies a preset of
        :data:`PRESETS` over the recipe and the config file.

    Returns
    -------
    Recipe
        The recipe.

    Raises
    ------
    DataError
        If the config file cannot be read or is not a JSON object, names an unknown
        recipe, preset or setting or another recipe than ``name``, or a setting's value has
        the wrong type, lies outside its range or does not go with the others (see
        :meth:`Recipe.validate`; the message names the setting, its value and what it may be).
    """
    settings: dict[str, Any] = {}
    if config is not None:
        try:
            settings = json.loads(Path(config).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"cannot read recipe config {config}: {error}") from None
        if not isinstance(settings, dict):
            raise DataError(
                f"recipe config {config} must hold a JSON object, got {type(settings).__name__}"
            )
        unknown = set(settings) - {"name"} - {field.name for field in dataclasses.fields(Recipe)}
        if unknown:
            raise DataError(f"recipe config {config}: {unknown_settings_message(unknown, Recipe)}")
    if name is not None and "name" in settings and settings["name"] != name:
        raise DataError(
            f'recipe {name!r} and the "name" of recipe config {config} '
            f"({settings['name']!r}) disagree; give one of them, or the same name in both"
        )
    name = name or settings.get("name")
    if not isinstance(name, str) or name not in RECIPES:
        raise DataError(
            f'unknown recipe {name!r}; give --recipe or a "name" in the config, one of '
            f"{sorted(RECIPES)}"
        )
    settings.pop("name", None)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    preset = overrides.pop("preset", None)
    if preset is not None:  # a preset given here overrides the config file's settings
        if not isinstance(preset, str) or preset not in PRESETS:
            raise DataError(f"unknown preset {preset!r}; one of {sorted(PRESETS)}")
        settings.update(PRESETS[preset], preset=preset)
    settings.update(overrides)
    return RECIPES[name].replace(**settings)


def _known(table: Mapping[str, Any], name: str, what: str, recipe: Recipe) -> Any:
    """``table[name]``, or an error naming the known entries."""
    if name not in table:
        raise DataError(
            f"recipe {recipe.name}: unknown {what} {name!r}; known: {', '.join(sorted(table))}"
        )
    return table[name]


def build_dataset(
    recipe: Recipe,
    data_root: str | os.PathLike[str],
    split: str = "train",
    *,
    check_files: bool = False,
):
    """The recipe's dataset (full-size images; the trainer crops and resizes).

    Segmentation masks are resized to ``task_size`` (nearest), matching the task input; with
    ``data_crop`` every pair is cropped (and flipped, and darkened, blurred or made noisy as
    the recipe's augmentation settings say) when it is read; with ``stride`` every
    ``stride``-th pair is kept.

    With ``check_files`` the header of every kept pair's two images is read once here
    (:meth:`~tdfusion.data.PairedImageDataset.check_files`: sizes and formats, no pixel is
    decoded), so that an unreadable file or a pair of two sizes is refused before training
    rather than when an epoch reaches it; :func:`train` does so.

    Parameters
    ----------
    recipe : Recipe
        The recipe.
    data_root : str or os.PathLike
        Dataset root in its standard layout.
    split : str
        ``"train"`` or ``"test"``.
    check_files : bool
        Read every kept pair's image headers and refuse unreadable files and size mismatches.

    Returns
    -------
    torch.utils.data.Dataset
        Samples ``(a, b, target)``.

    Raises
    ------
    DataError
        If the root does not hold the dataset (the message names what is missing and the
        layout expected, from :data:`tdfusion.data.layouts.LAYOUTS`), the recipe's settings
        are invalid (:meth:`Recipe.validate`), or, with ``check_files``, an image header cannot
        be read or the two images of a pair differ in size (the message names the files).
    """
    from tdfusion.data.datasets import keep_every
    from tdfusion.data.layouts import LAYOUTS

    recipe.validate()
    reader = _known(DATASETS, recipe.dataset, "dataset", recipe)
    try:
        dataset = reader(recipe, data_root, split, read_transform(recipe))
    except DataError as error:
        layout = LAYOUTS[recipe.dataset].description.format(split=split)
        raise DataError(f"{error}; a {recipe.dataset} data root holds {layout}") from None
    dataset = keep_every(dataset, recipe.stride)
    check = getattr(dataset, "check_files", None)
    if check_files and check is not None:  # a reader of another kind is checked as it reads
        check()
    return dataset


def build_task(recipe: Recipe) -> Any:
    """The recipe's task network, from scratch (nothing is downloaded).

    Parameters
    ----------
    recipe : Recipe
        The recipe.

    Returns
    -------
    torch.nn.Module or callable
        A :class:`~tdfusion.tasks.SegmentationTask` or :class:`~tdfusion.tasks.DetectionTask`,
        or :func:`no_task` for ``task="none"``.

    Raises
    ------
    DataError
        If the recipe names an unknown task (the message lists the known ones).
    """
    return _known(TASKS, recipe.task, "task", recipe)(recipe)


def build_trainer(
    recipe: Recipe,
    device: str | torch.device | None = None,
    *,
    resume_from: str | os.PathLike[str] | None = None,
):
    """ReFusionNet F, LossGenerator G and the task network T, in a trainer set up as recipe says.

    ``F`` starts from ``recipe.init_weights`` when the recipe names them, except for a run
    that will be resumed (``resume_from``): the checkpoint replaces every weight, so ``F``
    is then built with the checkpoint's architecture and ``init_weights`` is not read (a
    resumed run does not need that file any more).

    Parameters
    ----------
    recipe : Recipe
        The recipe.
    device : str or torch.device, optional
        Training device.
    resume_from : str or os.PathLike, optional
        The trainer checkpoint the run will be resumed from (the caller passes it to
        ``fit(resume=...)``); ``None``: a fresh start.

    Returns
    -------
    tdfusion.MetaFusionTrainer
        The trainer.

    Raises
    ------
    DataError
        If ``recipe.init_weights`` is not found on a fresh start, or the recipe's settings are
        invalid (:meth:`Recipe.validate`) or do not go together.
    """
    from tdfusion import LearnableFusionLoss, LossGenerator, MetaFusionTrainer
    from tdfusion.nets import FixedLossWeights, ReFusionNet

    recipe.validate()
    torch.manual_seed(recipe.seed)
    if recipe.loss_weights == "learned":
        generator: torch.nn.Module = LossGenerator()
    else:
        if recipe.meta_steps:
            raise DataError(
                f"recipe {recipe.name}: fixed loss weights ({recipe.loss_weights!r}) cannot be "
                f"learned; set meta_steps to 0 (got {recipe.meta_steps})"
            )
        generator = FixedLossWeights(recipe.loss_weights)  # type: ignore[arg-type]
    if recipe.precision == "fp16" and recipe.meta_steps:
        raise DataError(
            f"recipe {recipe.name}: precision 'fp16' trains the fusion phase only; its "
            f"{recipe.meta_steps} meta steps per epoch need precision 'bf16' (or 'fp32'), or "
            "set meta_steps to 0"
        )
    if resume_from is not None:
        # Only the architecture matters: resuming overwrites the weights.
        fusion = ReFusionNet.from_pretrained(resume_from)
    elif recipe.init_weights is None:
        fusion = ReFusionNet()
    else:
        try:
            fusion = ReFusionNet.from_pretrained(recipe.init_weights)
        except FileNotFoundError as error:
            raise DataError(
                f"recipe {recipe.name}: init_weights: {error}; give an existing weights file or "
                "bundled name (--init-weights), or train the stage that writes it first"
            ) from None
    if recipe.grad_checkpointing:
        for network in (fusion, generator):
            if hasattr(network, "set_grad_checkpointing"):
                network.set_grad_checkpointing()
    return MetaFusionTrainer(
        fusion,
        build_task(recipe),
        generator,
        LearnableFusionLoss(alpha=recipe.alpha, weighting=recipe.weighting),  # type: ignore[arg-type]
        inner_lr=recipe.inner_lr,
        generator_lr=recipe.generator_lr,
        generator_update=recipe.generator_update,  # type: ignore[arg-type]
        fusion_lr=recipe.lr,
        task_lr=recipe.lr,
        fusion_crop=recipe.fusion_crop,
        task_size=None if recipe.task_size is None else tuple(recipe.task_size),
        lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.StepLR(
            optimizer, recipe.step_size, recipe.gamma
        ),
        device=device,
        seed=recipe.seed,
        task_inner_optimizer=recipe.task_inner_optimizer,  # type: ignore[arg-type]
        fusion_step_order=recipe.fusion_step_order,  # type: ignore[arg-type]
        precision=recipe.precision,  # type: ignore[arg-type]
        compile=recipe.compile,
        channels_last=recipe.channels_last,
    )


def train(
    recipe: Recipe,
    data_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    resume: bool = True,
    progress: bool = True,
):
    """Train with a recipe into ``out`` (checkpoint every epoch; resumes from it by default).

    Writes ``out/recipe.json``, ``out/checkpoint.pt`` (every epoch), ``out/training_log.csv``
    and, at the end, ``out/fusion_model.pt`` and (with learned loss weights)
    ``out/loss_generator.pt`` (``save_pretrained`` files for ``tdfusion fuse`` and
    ``tdfusion weights``).

    The training data are checked before anything is written into ``out``: the dataset is
    built with ``check_files=True`` (:func:`build_dataset`), which reads the header of every
    image. A file that fails only when its pixels are decoded (a truncated JPEG) stops training
    when an epoch reaches it, with a :class:`~tdfusion.errors.DataError` naming it; the run
    resumes from ``out/checkpoint.pt`` (the last finished epoch) once the file is fixed.

    A run resumed from ``out/checkpoint.pt`` must have the recipe of ``out/recipe.json``,
    except for the settings of ``RESUMABLE_CHANGES``: ``epochs`` (train further),
    ``num_workers`` and the execution settings ``precision``, ``compile``, ``channels_last``
    and ``grad_checkpointing``. ``init_weights`` is not compared: a resumed run does not read
    it (the checkpoint replaces the weights), and ``out/recipe.json`` keeps the weights the run
    started from. ``out/recipe.json`` is rewritten only once that check passes. A checkpoint
    without ``out/recipe.json`` beside it is not resumed, since its settings cannot be checked.
    A run whose checkpoint is already at ``epochs`` (or past it) trains nothing and writes
    nothing: it warns (:class:`~tdfusion.recipe_runs.NothingToTrainWarning`) and returns the
    trainer with the checkpoint loaded.

    With ``resume=False`` the earlier run's ``out/checkpoint.pt``, ``out/fusion_model.pt``
    and ``out/loss_generator.pt`` are deleted (and its rows of ``out/training_log.csv``
    dropped) when training starts, so that an interrupted new run is never mixed with them.

    Under ``torchrun`` with several processes this joins their process group and trains
    data-parallel (see :doc:`/howto/distributed`): ``batch_size`` is per process, and rank 0
    alone writes the files. ``out`` must be on a file system every rank sees for resuming.

    Parameters
    ----------
    recipe : Recipe
        The protocol.
    data_root : str or os.PathLike
        Dataset root.
    out : str or os.PathLike
        Output folder.
    device : str or torch.device, optional
        Training device.
    resume : bool
        Continue from ``out/checkpoint.pt`` when it exists; False: start over, deleting the
        earlier run's checkpoint and weights in ``out``.
    progress : bool
        Show progress bars.

    Returns
    -------
    tdfusion.MetaFusionTrainer
        The trained trainer.

    Raises
    ------
    OutputInUseError
        If another process trains into ``out`` (rank 0 holds an
        :func:`~tdfusion.files.output_lock` on it while training).
    DataError
        If the recipe's settings are invalid (:meth:`Recipe.validate`), its ``fusion_crop`` is
        larger than the training images, the data root does not hold the dataset, an image
        header cannot be read or a pair's images differ in size (nothing is written into
        ``out`` then), an image cannot be decoded during training, or the run would resume
        ``out/checkpoint.pt`` without ``out/recipe.json`` or with a recipe that differs from it
        in a setting outside ``RESUMABLE_CHANGES`` and ``NOT_COMPARED_ON_RESUME`` (the message
        lists them; ``out`` is left as it was). A run that fails before training leaves no
        output folder it created.
    """
    recipe.validate()
    out = Path(out)
    checkpoint = out / "checkpoint.pt"
    # Building the trainer joins the process group under torchrun (this function starts none);
    # its strategy says whether this process writes the files.
    resume_from = checkpoint if resume and checkpoint.is_file() else None
    trainer = build_trainer(recipe, device, resume_from=resume_from)
    strategy = trainer.strategy
    # A resume with other settings is refused before the data are read (and again under the
    # output folder's lock); the data are read (every image's header) before anything is
    # written into out.
    refusal = strategy.broadcast_object(
        _recipe_changes(out / "recipe.json", recipe, checkpoint)
        if strategy.is_main and resume_from is not None
        else None
    )
    if refusal is not None:
        raise DataError(refusal)
    dataset = build_dataset(recipe, data_root, "train", check_files=True)
    _check_fusion_crop(recipe, dataset)
    if len(dataset) < 2 * recipe.batch_size and recipe.meta_steps > 0:
        raise DataError(
            f"{data_root}: {len(dataset)} training pair(s) found; a meta step needs two batches "
            f"of {recipe.batch_size}"
        )
    created = missing_folders(out)
    with contextlib.ExitStack() as stack:
        if strategy.is_main:
            stack.enter_context(output_lock(out, purpose="training"))
        try:
            _train_into(recipe, trainer, dataset, out, resume, progress, resume_from is not None)
        except BaseException:
            stack.close()
            if strategy.is_main:
                remove_unused_folders(created, out, {LOCK_NAME, "recipe.json"})
            raise
    strategy.barrier()
    return trainer


def _train_into(
    recipe: Recipe,
    trainer,
    dataset,
    out: Path,
    resume: bool,
    progress: bool,
    built_for_resume: bool,
):
    from torch.utils.data import DataLoader, default_collate

    from tdfusion.data import DetectionPairDataset, SwapSources, detection_collate
    from tdfusion.trainer import CSVLogger
    from tdfusion.trainer.checkpoint import load_checkpoint

    strategy = trainer.strategy
    main_process = strategy.is_main
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    # Rank 0 decides whether to resume, so that all ranks agree even if only it sees the file.
    resume_from = strategy.broadcast_object(resume and checkpoint.is_file())
    if resume_from and not checkpoint.is_file():
        raise DataError(
            f"rank {strategy.rank} cannot read {checkpoint}, from which rank 0 resumes; "
            "put --out on a file system that every node sees"
        )
    if resume_from != built_for_resume:  # the checkpoint came or went since the trainer was built
        raise DataError(
            f"{checkpoint} was {'removed' if built_for_resume else 'written'} by another "
            "process while this run started; run again"
        )
    if resume_from:
        refusal = strategy.broadcast_object(
            _recipe_changes(out / "recipe.json", recipe, checkpoint) if main_process else None
        )
        if refusal is not None:
            raise DataError(refusal)
        done = strategy.broadcast_object(_checkpoint_epoch(checkpoint) if main_process else None)
        if done is not None and done >= recipe.epochs:
            # Nothing to train: recipe.json, the checkpoint and the weights stay as they are.
            trainer.load_state_dict(load_checkpoint(checkpoint), source=checkpoint)
            if main_process:
                warnings.warn(NothingToTrainWarning(out, done, recipe.epochs), stacklevel=3)
            return trainer
    # Box lists differ in length from sample to sample; masks and names stack as usual.
    collate = detection_collate if isinstance(dataset, DetectionPairDataset) else default_collate
    loader = DataLoader(
        dataset,
        batch_size=recipe.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= 2 * recipe.batch_size,
        collate_fn=SwapSources(collate) if recipe.swap else collate,
        num_workers=recipe.num_workers,
        generator=torch.Generator().manual_seed(recipe.seed),
    )
    if main_process:
        if not resume:
            _remove_earlier_run(out)
        (out / "recipe.json").write_text(
            _recipe_file(recipe, out / "recipe.json", bool(resume_from))
        )
    stopped = None
    try:
        trainer.fit(
            loader,
            epochs=recipe.epochs,
            meta_steps=recipe.meta_steps,
            fusion_steps=recipe.fusion_steps,
            checkpoint=checkpoint,
            resume=checkpoint if resume_from else None,
            callbacks=[CSVLogger(out / "training_log.csv")],
            progress=progress,
        )
    except DataError as error:  # an image that fails only when decoded, mid-epoch
        stopped = _stopped_message(error, checkpoint, trainer.epoch)
    if stopped is not None:
        # Raised without the loader's error attached: its traceback holds the loader, whose
        # worker processes (which share the lock of out) would live on with it.
        raise DataError(stopped)
    if main_process:
        trainer.fusion_model.save_pretrained(out / "fusion_model.pt")
        if recipe.loss_weights == "learned":
            trainer.loss_generator.save_pretrained(out / "loss_generator.pt")
    return trainer


def _check_fusion_crop(recipe: Recipe, dataset: Any) -> None:
    """Refuse a ``fusion_crop`` larger than the training images before training starts.

    The pairs are ``data_crop`` square when the recipe crops them as they are read; otherwise
    the first pair's images are measured (read without the dataset's random transform, so that
    the data order and the crops stay as they were).
    """
    if recipe.fusion_crop is None or recipe.data_crop is not None or len(dataset) == 0:
        return
    read_pair = getattr(dataset, "read_pair", None)
    if read_pair is None:  # a dataset of another kind: the trainer checks every batch
        return
    height, width = read_pair(0)[0].shape[-2:]
    if recipe.fusion_crop > min(height, width):
        raise DataError(
            f"recipe {recipe.name}: fusion_crop must be at most {min(height, width)}, the "
            f"shorter side of the training images ({width}x{height}, width x height, e.g. "
            f"{dataset.names[0]}), got {recipe.fusion_crop}"
        )


def make_smoke_dataset(recipe: Recipe, folder: str | os.PathLike[str]) -> Path:
    """Lay out the bundled sample in the recipe's dataset format, for a quick end-to-end run.

    Segmentation masks are derived from the sample's boxes (inside each box the warmer half
    of the infrared gets the box's class, 0 elsewhere); detection annotations are the
    sample's boxes, written as YOLO or VOC files as the layout needs (see
    ``tdfusion.data.sample.write_sample_layout``).

    Parameters
    ----------
    recipe : Recipe
        The recipe whose layout to write.
    folder : str or os.PathLike
        Where to write it.

    Returns
    -------
    pathlib.Path
        The dataset root.
    """
    from tdfusion.data.layouts import LAYOUTS
    from tdfusion.data.sample import write_sample_layout

    layout = _known(LAYOUTS, recipe.dataset, "dataset", recipe)
    task = None if recipe.task == "none" else recipe.task
    return write_sample_layout(layout, folder, task, num_classes=recipe.num_classes)
