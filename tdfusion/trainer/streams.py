"""The random streams of the two phases of :func:`~tdfusion.trainer.loop.fit`.

The fusion phase's batches, their order, their crops and every random number drawn while they
are read and trained on must not depend on how many meta steps came before: then a run with
``meta_steps=0`` (the fixed-loss ablation) is a controlled comparison with one that learns the
loss. So the meta phase draws from streams of its own:

- its batches from a twin of the loader (:func:`meta_phase_loader`), with its own shuffling
  seed, its own pass count and its own generator (the seeds of its worker processes);
- its crops from the trainer's ``meta_generator``;
- everything drawn in this process while it runs (PyTorch's, Python's and NumPy's global
  generators: dropout, random transforms read without workers; the generators of the
  dataset's transforms) from a state of its own (:class:`MetaPhaseRandomness`), swapped in
  when the phase starts and out when it ends.

The states of all of them are in the checkpoints (:func:`loader_generators`,
:func:`dataset_generators`), so that a resumed run goes on exactly.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tdfusion.distributed import loader_with_sampler
from tdfusion.trainer.batches import independent_generator
from tdfusion.trainer.checkpoint import capture_rng_state, restore_rng_state

if TYPE_CHECKING:  # pragma: no cover
    from tdfusion.trainer.trainer import MetaFusionTrainer

__all__ = [
    "MetaPhaseRandomness",
    "dataset_generators",
    "loader_generators",
    "meta_phase_loader",
]

#: Added to the data seed for the meta phase's twin loader (see :func:`meta_phase_loader`).
#: PyTorch's CPU generator keeps only the low 32 bits of a seed, so the offset lies in them:
#: the twin's pass k would meet the fusion passes' shuffle only after about 2.6e9 passes.
META_SEED_OFFSET = 0x9E3779B9


def meta_phase_loader(trainer: MetaFusionTrainer, loader: Iterable[Any]) -> Iterable[Any]:
    """The loader the meta phase draws its batches from: a twin of ``loader`` when possible.

    A plain :class:`~torch.utils.data.DataLoader` around a ``DistributedSampler`` (what
    :func:`~tdfusion.trainer.loop.shard_for_training` makes of a shuffling loader) or a
    ``SequentialSampler`` gets a twin with the same data and settings, its own shuffling
    seed and its own generator (``trainer.meta_loader_generator``, made once and kept in
    checkpoints: the seeds of its workers), so the fusion phase's batches and their order do
    not depend on ``meta_steps``. Any other loader is shared by the two phases; its own
    generators (:func:`loader_generators`) are then swapped per phase by
    :class:`MetaPhaseRandomness`, so that its order does not depend on ``meta_steps``
    either (when it draws from no generator of its own, it draws from the global ones,
    which are swapped anyway).

    Parameters
    ----------
    trainer : tdfusion.trainer.MetaFusionTrainer
        Its ``data_seed`` seeds the twin.
    loader : iterable
        The fusion phase's loader (after ``shard_for_training``).

    Returns
    -------
    iterable
        The twin, or ``loader`` itself.
    """
    from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

    sampler = getattr(loader, "sampler", None)
    if type(loader) is not DataLoader or loader.batch_size is None:
        return loader
    if type(sampler) is DistributedSampler:
        # DistributedSampler shuffles pass k by seed + k: an offset (in the low 32 bits the
        # generator keeps) far beyond any pass count keeps the meta passes' shuffles apart
        # from the fusion passes'.
        seed = (sampler.seed + META_SEED_OFFSET) % 2**62
        twin_sampler: Any = DistributedSampler(
            loader.dataset,
            num_replicas=sampler.num_replicas,
            rank=sampler.rank,
            shuffle=sampler.shuffle,
            seed=seed,
            drop_last=sampler.drop_last,
        )
    elif type(sampler) is SequentialSampler:
        seed = ((trainer.data_seed or 0) + META_SEED_OFFSET) % 2**62
        twin_sampler = SequentialSampler(loader.dataset)
    else:
        return loader
    if trainer.meta_loader_generator is None:
        trainer.meta_loader_generator = torch.Generator().manual_seed(seed)
    return loader_with_sampler(loader, twin_sampler, trainer.meta_loader_generator)


def loader_generators(loader: Any) -> list[torch.Generator | None]:
    """A data loader's own generators, whose states a checkpoint carries to resume exactly.

    Parameters
    ----------
    loader : Any
        A data loader or any iterable.

    Returns
    -------
    list of torch.Generator or None
        The generators of the loader, its sampler, its batch sampler and the batch sampler's
        sampler (a custom ``batch_sampler``'s), in that order; ``None`` where there is none
        or where the generator is one listed before (the positions stay fixed).
    """
    batch_sampler = getattr(loader, "batch_sampler", None)
    owners = (
        loader,
        getattr(loader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
    )
    found: list[torch.Generator | None] = []
    for owner in owners:
        generator = getattr(owner, "generator", None)
        known = any(generator is earlier for earlier in found)
        found.append(generator if isinstance(generator, torch.Generator) and not known else None)
    return found


def dataset_generators(loader: Any) -> list[torch.Generator]:
    """The CPU generators held by a loader's dataset (its transforms'), in a fixed order.

    Random transforms such as :class:`~tdfusion.data.RandomCrop` keep a generator; without
    worker processes they draw from it in this process, so its state is part of where a run
    stands. The search starts at the dataset and enters objects' attributes (``__dict__`` and
    ``__slots__``), lists, tuples, sets and dicts, ``functools.partial`` objects (function,
    arguments, keywords), functions' closures and defaults, and bound methods; tensors,
    arrays, strings, numbers, paths, classes and modules are not entered. It stops after
    ``SEARCH_LIMIT`` (20,000) objects (a dataset that holds more, e.g. a list of per-image
    records, is searched in part) and then warns, since a generator it did not find is
    neither saved in checkpoints nor kept apart from the meta phase.

    Parameters
    ----------
    loader : Any
        A data loader, or any iterable (which has no dataset: none are found).

    Returns
    -------
    list of torch.Generator
        Each generator once.

    Example
    -------
    >>> from torch.utils.data import DataLoader
    >>> from tdfusion.data import Compose, RandomCrop
    >>> class Pairs(torch.utils.data.Dataset):
    ...     def __init__(self):
    ...         crop = RandomCrop(8, generator=torch.Generator().manual_seed(0))
    ...         self.transform = Compose([crop])
    ...     def __len__(self):
    ...         return 2
    ...     def __getitem__(self, index):
    ...         return index
    >>> len(dataset_generators(DataLoader(Pairs())))
    1
    """
    found: list[torch.Generator] = []
    seen: set[int] = set()
    # Breadth first, so that a long container deep down cannot use up the search before the
    # transforms near the top are reached.
    queue: deque[Any] = deque([getattr(loader, "dataset", None)])
    while queue:
        value = queue.popleft()
        if id(value) in seen or value is None:
            continue
        if len(seen) >= SEARCH_LIMIT:
            warnings.warn(
                f"the search of the dataset for random generators stopped after {SEARCH_LIMIT} "
                "objects: a torch.Generator held beyond them (by a transform) is not saved in "
                "checkpoints, so a resumed run may not go on exactly, and the meta phase may "
                "draw from it. Keep the dataset's transforms near its top (e.g. in a "
                "'transform' attribute)",
                stacklevel=3,
            )
            break
        seen.add(id(value))
        if isinstance(value, torch.Generator):
            if value.device.type == "cpu":
                found.append(value)
            continue
        queue.extend(part for part in _parts(value) if not _plain(part))
    return found


#: How many objects :func:`dataset_generators` looks at before it stops and warns.
SEARCH_LIMIT = 20_000
_NOT_SEARCHED = (
    torch.Tensor,
    np.ndarray,
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    bool,
    Path,
    type,
    types.ModuleType,
)


def _parts(value: Any) -> list[Any]:
    """The objects ``value`` holds that :func:`dataset_generators` searches next."""
    if isinstance(value, _NOT_SEARCHED):
        return []
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, functools.partial):
        return [value.func, *value.args, *value.keywords.values()]
    if isinstance(value, types.MethodType):
        return [value.__self__, value.__func__]
    if isinstance(value, types.FunctionType):
        cells = [cell.cell_contents for cell in value.__closure__ or () if _filled(cell)]
        return [*cells, *(value.__defaults__ or ()), *(value.__kwdefaults__ or {}).values()]
    parts: list[Any] = []
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict):
        parts.extend(attributes.values())
    for cls in type(value).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name in ("__dict__", "__weakref__"):
                continue
            if name.startswith("__") and not name.endswith("__"):  # stored name-mangled
                name = f"_{cls.__name__.lstrip('_')}{name}"
            if hasattr(value, name):
                parts.append(getattr(value, name))
    return parts


def _plain(value: Any) -> bool:
    """Plain data (a path, a number, a short tuple or dict of them: a file list's entries),
    which holds no generator and is not counted against ``SEARCH_LIMIT``."""
    if isinstance(value, _NOT_SEARCHED):
        return True
    if isinstance(value, dict):
        value = tuple(value.values())
    return (
        isinstance(value, (tuple, list))
        and len(value) <= 16
        and all(isinstance(item, _NOT_SEARCHED) for item in value)
    )


def _filled(cell: Any) -> bool:
    """Whether a closure cell holds a value (a cell of a name not yet bound is empty)."""
    try:
        cell.cell_contents  # noqa: B018 (reading it is the test)
    except ValueError:
        return False
    return True


class MetaPhaseRandomness:
    """The random state the meta phase draws from in this process, kept apart from the
    fusion phase's.

    Used as ``with randomness:`` around each meta phase: on entry the fusion phase's state
    (PyTorch's CPU and CUDA, Python's and NumPy's global generators, and ``generators``) is
    put aside and the meta phase's put in place (seeded from the trainer's
    ``meta_generator`` the first time); on exit the other way round. Its ``state`` between
    phases is what checkpoints keep.

    Parameters
    ----------
    trainer : tdfusion.trainer.MetaFusionTrainer
        Its ``meta_random_state`` holds the meta phase's state between phases.
    generators : sequence of torch.Generator or None
        Further generators the phases share: the dataset's (:func:`dataset_generators`), and
        the loader's own when both phases read one loader. Each is swapped once (``None``
        entries and repeats are dropped).
    """

    def __init__(
        self, trainer: MetaFusionTrainer, generators: Sequence[torch.Generator | None]
    ) -> None:
        self.trainer = trainer
        self.generators: list[torch.Generator] = []
        for generator in generators:
            if generator is not None and not any(generator is known for known in self.generators):
                self.generators.append(generator)
        self._fusion_state: dict[str, Any] | None = None

    def __enter__(self) -> MetaPhaseRandomness:
        self._fusion_state = capture_rng_state(*self.generators)
        state = self.trainer.meta_random_state
        if state is None:
            self._seed()
        else:
            restore_rng_state(state, *self.generators)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.trainer.meta_random_state = capture_rng_state(*self.generators)
        assert self._fusion_state is not None
        restore_rng_state(self._fusion_state, *self.generators)
        self._fusion_state = None

    def _seed(self) -> None:
        """The meta phase's first state: every stream seeded from the trainer's seed."""
        import random

        seed = independent_generator(self.trainer.meta_generator).initial_seed()
        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002 (the legacy global stream is the one shared)
        torch.manual_seed(seed)  # the CUDA devices' too
        for index, generator in enumerate(self.generators):
            generator.manual_seed((seed + index + 1) % 2**62)
