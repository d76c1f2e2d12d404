"""The training loop: epochs of meta steps and a fusion pass, with progress, callbacks,
learning-rate schedules and checkpoints (paper Algorithm 1).

The loop knows nothing of how a step is computed: it draws batches, calls
:meth:`~tdfusion.trainer.MetaFusionTrainer.meta_step` and
:meth:`~tdfusion.trainer.MetaFusionTrainer.fusion_step`, and keeps the loop position on the
trainer (``epoch``, ``global_step``, ``history``, ``data_passes``, ``data_seed``), where
checkpoints find it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from tdfusion._progress import bar_options
from tdfusion.distributed import shuffles_plainly
from tdfusion.errors import CheckpointError, DataError, DistributedError, OutputInUseError
from tdfusion.files import output_lock
from tdfusion.trainer.batches import Batch
from tdfusion.trainer.callbacks import Callback
from tdfusion.trainer.checkpoint import (
    load_checkpoint,
    restore_generators,
    restore_rng_state,
    save_trainer,
    saved_rng_state,
)
from tdfusion.trainer.streams import (
    MetaPhaseRandomness,
    dataset_generators,
    loader_generators,
    meta_phase_loader,
)

if TYPE_CHECKING:  # pragma: no cover
    from tdfusion.trainer.trainer import MetaFusionTrainer

__all__ = ["fit", "shard_for_training"]

#: Summary keys shown at the end of an epoch, with their labels.
_EPOCH_LINE = {
    "meta_task_loss": "meta task",
    "fusion_loss": "fusion",
    "fusion_intensity": "int",
    "fusion_gradient": "grad",
    "task_loss": "task",
    "weight_a_mean": "mean w_a",
}


def fit(
    trainer: MetaFusionTrainer,
    train_loader: Iterable[Batch],
    epochs: int,
    meta_steps: int = 200,
    *,
    fusion_steps: int | None = None,
    resume: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train with the alternating schedule of the paper (Algorithm 1).

    Per epoch: ``meta_steps`` generator updates, each drawing two consecutive (different)
    batches from a fresh pass over ``train_loader`` (meta-train, meta-test; the pass
    restarts when it runs out), then one pass of ``fusion_step`` over the loader, then the
    learning-rate schedules step, the ``checkpoint`` is written and the callbacks are told.
    With ``meta_steps=0`` the generator stays frozen (a default generator then gives the
    ablation with ``w_a = w_b = 1/2`` only if it outputs 1/2; see the docs). This is the
    method ``MetaFusionTrainer.fit`` (``fit(trainer, ...)`` as a function).

    Parameters
    ----------
    train_loader : iterable
        Yields batches ``(a, b, target)``, e.g. a :class:`torch.utils.data.DataLoader` with
        ``shuffle=True``; it must yield at least two batches when ``meta_steps > 0``.
    epochs : int
        Total number of epochs; a resumed run continues up to this number.
    meta_steps : int
        Generator updates per epoch (``M``; the paper uses 200).
    fusion_steps : int, optional
        Cap on the fusion steps per epoch (``N``); default one full pass.
    resume : str or os.PathLike, optional
        Checkpoint to continue from (written by ``save`` or by ``checkpoint``).
    checkpoint : str or os.PathLike, optional
        File rewritten atomically after every epoch with everything needed to resume. The
        main process holds a lock on it while ``fit`` runs (a second ``fit`` writing the same
        file fails at once), and a checkpoint holding NaN or infinite values is never written.
    callbacks : sequence of Callback
        Hooks called after each step and epoch (e.g. :class:`~tdfusion.trainer.CSVLogger`).
    progress : bool
        Show tqdm progress bars with running losses.

    Returns
    -------
    list of dict
        ``history``: one summary per epoch: the mean losses of each phase over the steps
        that updated (steps skipped by ``on_nonfinite="skip"`` are left out of the means,
        NaN when every step was skipped), ``meta_steps`` and ``fusion_steps`` (steps run) and
        ``meta_skipped`` and ``skipped`` (how many of them were skipped).

    Raises
    ------
    ValueError
        If ``epochs``, ``meta_steps`` or ``fusion_steps`` is negative.
    TypeError
        If ``train_loader`` is a one-shot iterator (a generator, ``iter(loader)``).
    DataError
        If ``train_loader`` yields no batches.
    CheckpointError
        If ``checkpoint`` names a directory, or ``resume`` names a checkpoint trained with
        other optimiser settings or learning rates than this trainer's (to change learning
        rates, rebuild the trainer with :meth:`MetaFusionTrainer.load`).
    OutputInUseError
        If another process (or another ``fit`` of this one) is writing ``checkpoint``.
    NonFiniteLossError
        With ``on_nonfinite="raise"``, at a NaN or infinite loss or gradient; and whenever
        the models hold non-finite values when the checkpoint is due (the last one is kept).
    SystemExit
        With status 143 (128 + SIGTERM) when the process is sent ``SIGTERM``: like Ctrl-C,
        a checkpoint write in progress is abandoned and the previous checkpoint kept.

    Notes
    -----
    The meta phase has random streams of its own (see :mod:`tdfusion.trainer.streams`): its
    crops come from the trainer's ``meta_generator``, a ``DataLoader`` is read by the meta
    phase through a twin with its own shuffling seed and generator, and while it runs the
    global generators and the dataset's transforms draw from the meta phase's own state. So
    the fusion phase's batches, their order, crops, augmentations and dropout masks are the
    same whatever ``meta_steps`` is, and ``meta_steps=0`` is a controlled ablation. A loader
    that cannot be rebuilt (a custom batch sampler, a sampler other than a shuffling, in-order
    or distributed one) is shared by both phases, its own generators swapped per phase like
    the global ones.

    In a distributed run every rank calls ``fit`` with the same arguments. A plain
    :class:`~torch.utils.data.DataLoader` is rebuilt around a
    :class:`~torch.utils.data.distributed.DistributedSampler` (shuffled when the loader
    was), so each rank trains on its own share and the global batch is ``world_size``
    times the loader's; a loader that already has a ``DistributedSampler`` is used as it
    is. A shuffling ``DataLoader`` is rebuilt the same way in a single process (a
    ``DistributedSampler`` of one replica, seeded by the loader's generator and
    reshuffled every pass), so that ``N`` processes with batch ``n`` train on the same
    global batches as one process with batch ``N * n``. Callbacks run on every rank (the
    statistics they get are means over ranks); the built-in loggers write on rank 0 only,
    as do progress bars and ``checkpoint``. The ``resume`` file must be readable by every
    rank.

    ``SIGTERM`` is handled while ``fit`` runs in the main thread and the signal has its
    default action (a handler of the caller's is left alone); the previous handler is
    restored when ``fit`` returns. A run already at ``epochs`` warns that there is nothing
    to train.
    """
    if epochs < 0 or meta_steps < 0:
        raise ValueError(f"epochs and meta_steps must be >= 0, got {epochs} and {meta_steps}")
    if fusion_steps is not None and fusion_steps < 0:
        raise ValueError(
            f"fusion_steps must be >= 0 (or None for one full pass), got {fusion_steps}"
        )
    if isinstance(train_loader, Iterator):
        raise TypeError(
            f"train_loader is a one-shot iterator ({type(train_loader).__name__}): every epoch "
            "and every meta phase starts a new pass over the data, so a re-iterable loader is "
            "needed, e.g. a torch.utils.data.DataLoader or a list of batches"
        )
    if checkpoint is not None and Path(checkpoint).is_dir():
        raise CheckpointError(
            f"checkpoint={os.fspath(checkpoint)!r} is a directory; checkpoint names the file "
            f"rewritten after every epoch: pass a file path such as "
            f"{os.fspath(Path(checkpoint) / 'checkpoint.pt')!r}"
        )
    with contextlib.ExitStack() as stack:
        if checkpoint is not None:
            # The lock is the file's, not a link's: two links to one file share one lock.
            _lock_checkpoint(trainer, Path(os.path.realpath(checkpoint)), stack)
        stack.enter_context(_sigterm_exits())
        return _train(
            trainer,
            train_loader,
            epochs,
            meta_steps,
            fusion_steps=fusion_steps,
            resume=resume,
            checkpoint=checkpoint,
            callbacks=callbacks,
            progress=progress,
        )


def _lock_checkpoint(trainer: MetaFusionTrainer, checkpoint: Path, stack: Any) -> None:
    """Hold the checkpoint's lock on the main process; every rank fails if it is taken."""
    failure = None
    if trainer.strategy.is_main:
        try:
            stack.enter_context(output_lock(checkpoint.parent, checkpoint.name, purpose="training"))
        except OutputInUseError as error:
            failure = str(error)
    failure = trainer.strategy.broadcast_object(failure)
    if failure is not None:
        raise OutputInUseError(failure)


#: Exit status of a run ended by SIGTERM, the shell's convention (128 + signal number).
SIGTERM_STATUS = 128 + int(getattr(signal, "SIGTERM", 15))


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``SystemExit(143)`` as SIGINT raises
    KeyboardInterrupt: ``finally`` blocks run, so an atomic write in progress removes its
    temporary file and the last checkpoint stays. Only in the main thread (the only one
    that can set handlers) and only over the default action."""
    sigterm = getattr(signal, "SIGTERM", None)
    if (
        sigterm is None
        or threading.current_thread() is not threading.main_thread()
        or signal.getsignal(sigterm) is not signal.SIG_DFL
    ):
        yield
        return

    def exit_on_sigterm(signum: int, frame: Any) -> None:
        raise SystemExit(SIGTERM_STATUS)

    previous = signal.signal(sigterm, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(sigterm, previous)


def _train(
    trainer: MetaFusionTrainer,
    train_loader: Iterable[Batch],
    epochs: int,
    meta_steps: int,
    *,
    fusion_steps: int | None,
    resume: str | os.PathLike[str] | None,
    checkpoint: str | os.PathLike[str] | None,
    callbacks: Sequence[Callback],
    progress: bool,
) -> list[dict[str, Any]]:
    """The body of :func:`fit`, under its checkpoint lock and SIGTERM handler."""
    progress = progress and trainer.is_main_process
    resume_rng = None
    if resume is not None:
        # Read on the CPU: the modules and optimisers copy what they hold to their device, and
        # the saved random states (CPU tensors by nature) must stay there.
        state = load_checkpoint(resume, map_location="cpu")
        trainer.load_state_dict(state, source=resume)
        resume_rng = saved_rng_state(state, trainer.world_size, trainer.rank)
    if trainer.epoch >= epochs and trainer.is_main_process:
        source = "the trainer" if resume is None else f"checkpoint {os.fspath(resume)}"
        warnings.warn(
            f"nothing to train: {source} is at epoch {trainer.epoch} and epochs={epochs}; "
            "pass a larger epochs to train further",
            stacklevel=3,
        )
    train_loader = shard_for_training(trainer, train_loader, meta_steps)
    if _is_empty(train_loader):
        raise DataError(_NO_BATCHES)
    meta_loader = meta_phase_loader(trainer, train_loader)
    shared_generators: list[torch.Generator | None] = [*dataset_generators(train_loader)]
    own_generators = loader_generators(train_loader)
    # Saved after the loader's own, so that older checkpoints' positions still fit.
    generators = [*own_generators, *shared_generators]
    meta_generators = [trainer.meta_generator]
    if meta_loader is not train_loader:
        meta_generators += loader_generators(meta_loader)
    else:  # one loader for both phases: its order and worker seeds are swapped per phase too
        shared_generators += own_generators
    if resume_rng is not None:
        restore_rng_state(resume_rng, trainer.generator, *generators)
        restore_generators(resume_rng.get("meta_generators") or [], *meta_generators)
        trainer.meta_random_state = resume_rng.get("meta_phase")
    randomness = MetaPhaseRandomness(trainer, shared_generators)
    run = _Phases(trainer, train_loader, meta_loader, randomness, epochs, callbacks, progress)
    for callback in callbacks:
        callback.on_fit_start(trainer)
    while trainer.epoch < epochs:
        summary: dict[str, Any] = {"epoch": trainer.epoch}
        summary.update(run.meta_phase(meta_steps))
        summary.update(run.fusion_phase(fusion_steps))
        with warnings.catch_warnings():
            # A generator frozen with meta_steps=0 never steps its optimiser; its schedule
            # still advances with the epochs, which is what PyTorch warns about.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            for scheduler in trainer.schedulers.values():
                scheduler.step()
        trainer.epoch += 1
        trainer.history.append(summary)
        if progress:
            tqdm.write(_epoch_line(trainer.epoch, summary, epochs))
        if checkpoint is not None:
            save_trainer(
                trainer,
                checkpoint,
                loader_generators=generators,
                meta_generators=meta_generators,
            )
        for callback in callbacks:
            callback.on_epoch_end(trainer, summary)
    for callback in callbacks:
        callback.on_fit_end(trainer)
    return trainer.history


_NO_BATCHES = (
    "train_loader yielded no batches: nothing to train on (an empty dataset, or a batch "
    "size larger than the dataset with drop_last=True)"
)


def _is_empty(loader: Iterable[Batch]) -> bool:
    """Whether a loader with a length has none (one without a length is checked as it runs)."""
    try:
        return len(loader) == 0  # type: ignore[arg-type]
    except TypeError:
        return False


def _epoch_line(epoch: int, summary: Mapping[str, Any], epochs: int) -> str:
    parts = [f"{label} {summary[key]:.4g}" for key, label in _EPOCH_LINE.items() if key in summary]
    return f"epoch {epoch}/{epochs}: " + ", ".join(parts)


def shard_for_training(
    trainer: MetaFusionTrainer, loader: Iterable[Batch], meta_steps: int
) -> Iterable[Batch]:
    """The loader with this rank's share of the data (all of it in a single process).

    A plain shuffling DataLoader is rebuilt around a DistributedSampler in a single process
    too (with one replica it is a plain shuffle), so that ``N`` processes with batch ``n``
    see the same global batches as one process with batch ``N * n``.

    Parameters
    ----------
    trainer : tdfusion.trainer.MetaFusionTrainer
        Its strategy says how many shares there are; its ``data_seed`` is set on first use.
    loader : iterable
        The training data.
    meta_steps : int
        Generator updates per epoch (each needs two batches per rank).

    Returns
    -------
    iterable
        The loader to iterate.
    """
    from torch.utils.data import DataLoader

    strategy = trainer.strategy
    if not strategy.distributed:
        if not shuffles_plainly(loader):
            return loader
        return strategy.shard(loader, _data_seed(trainer, loader))
    if not isinstance(loader, DataLoader):
        if strategy.is_main:
            warnings.warn(
                f"train_loader is a {type(loader).__name__}, not a DataLoader, so tdfusion "
                "cannot shard it: each rank must yield its own share of the data, and the "
                "same number of batches",
                stacklevel=4,
            )
        return loader
    seed = _data_seed(trainer, loader) if shuffles_plainly(loader) else None
    loader = strategy.shard(loader, seed)
    if meta_steps > 0 and len(loader) < 2:
        raise DistributedError(
            f"with {strategy.world_size} ranks each rank gets {len(loader.sampler)} of the "  # type: ignore[arg-type]
            f"{len(loader.dataset)} training samples, {len(loader)} batch(es) of "  # type: ignore[arg-type]
            f"{loader.batch_size}; a meta step needs two (meta-train and meta-test). Use "
            "fewer processes or a smaller batch size"
        )
    return loader


def _data_seed(trainer: MetaFusionTrainer, loader: Any) -> int:
    """The shuffling seed of the DistributedSampler, the same on all ranks and kept in
    checkpoints: the loader generator's seed, else a draw from (a copy of) the trainer's."""
    if trainer.data_seed is None:
        generator = loader.generator
        if isinstance(generator, torch.Generator):
            seed = int(generator.initial_seed())
        else:
            copy_of_trainer_generator = torch.Generator()
            copy_of_trainer_generator.set_state(trainer.generator.get_state())
            seed = int(torch.randint(2**31 - 1, (1,), generator=copy_of_trainer_generator))
        trainer.data_seed = int(trainer.strategy.broadcast_object(seed))
    return trainer.data_seed


class _Phases:
    """The two phases of an epoch over one loader, with progress bars and callbacks."""

    def __init__(
        self,
        trainer: MetaFusionTrainer,
        loader: Iterable[Batch],
        meta_loader: Iterable[Batch],
        randomness: MetaPhaseRandomness,
        epochs: int,
        callbacks: Sequence[Callback],
        progress: bool,
    ) -> None:
        self.trainer = trainer
        self.loader = loader
        self.meta_loader = meta_loader
        self.randomness = randomness
        self.epochs = epochs
        self.callbacks = callbacks
        self.progress = progress

    def start_pass(self, phase: str = "fusion") -> Iterator[Batch]:
        """A new pass over the phase's data; a DistributedSampler is told which pass, to
        reshuffle (the meta phase counts its own passes when it has its own loader)."""
        from torch.utils.data import DistributedSampler

        trainer = self.trainer
        own_loader = phase == "meta" and self.meta_loader is not self.loader
        loader = self.meta_loader if own_loader else self.loader
        passes = trainer.meta_passes if own_loader else trainer.data_passes
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(passes)
        if own_loader:
            trainer.meta_passes += 1
        else:
            trainer.data_passes += 1
        return iter(loader)

    def meta_phase(self, meta_steps: int) -> dict[str, float]:
        """``meta_steps`` generator updates on pairs of consecutive batches of fresh passes."""
        if meta_steps == 0:
            return {"meta_steps": 0}

        def batch_pairs() -> Iterator[Callable[[], dict[str, float]]]:
            iterator = self.start_pass("meta")
            in_this_pass = 0
            for _ in range(meta_steps):
                pair: list[Batch] = []
                while len(pair) < 2:
                    try:
                        pair.append(next(iterator))
                        in_this_pass += 1
                    except StopIteration:
                        if in_this_pass < 2:
                            raise ValueError(
                                "train_loader must yield at least two batches for a meta step "
                                "(meta-train and meta-test)"
                            ) from None
                        iterator, in_this_pass = self.start_pass("meta"), 0
                        pair.clear()  # a pair never straddles two passes
                meta_train, meta_test = pair
                yield lambda meta_train=meta_train, meta_test=meta_test: self.trainer.meta_step(
                    meta_train, meta_test
                )

        with self.randomness:  # the meta phase's own random state
            return self.run("meta", batch_pairs(), meta_steps)

    def fusion_phase(self, fusion_steps: int | None) -> dict[str, float]:
        """One pass of fusion steps (at most ``fusion_steps``)."""
        try:
            total = len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        if fusion_steps is not None:
            total = fusion_steps if total is None else min(total, fusion_steps)

        def steps() -> Iterator[Callable[[], dict[str, float]]]:
            for index, batch in enumerate(self.start_pass("fusion")):
                if fusion_steps is not None and index >= fusion_steps:
                    break
                yield lambda batch=batch: self.trainer.fusion_step(batch)

        summary = self.run("fusion", steps(), total)
        if summary["fusion_steps"] == 0 and fusion_steps != 0:
            raise DataError(_NO_BATCHES)  # before any checkpoint of an empty epoch
        return summary

    def run(
        self, phase: str, steps: Iterable[Callable[[], dict[str, float]]], total: int | None
    ) -> dict[str, float]:
        """Take the steps, report each to the callbacks and the bar; the phase's means."""
        trainer = self.trainer
        sums: dict[str, float] = {}
        count = taken = 0
        label = "learn G" if phase == "meta" else "learn F+T"
        shown = ("task_loss", "fusion_loss") if phase == "meta" else ("fusion_loss", "task_loss")
        bar = tqdm(
            total=total,
            desc=f"epoch {trainer.epoch + 1}/{self.epochs} {label}",
            leave=False,
            dynamic_ncols=True,
            **bar_options(self.progress),
        )
        with bar:
            for step_index, step in enumerate(steps):
                stats = step()
                count += 1
                # A skipped step changed nothing and its losses are NaN: the means are over
                # the steps taken, and the skipped ones are counted.
                if not stats.get("skipped"):
                    taken += 1
                for key, value in stats.items():
                    if key != "skipped":
                        sums[key] = sums.get(key, 0.0) + (0.0 if stats.get("skipped") else value)
                record: dict[str, Any] = {
                    "phase": phase,
                    "epoch": trainer.epoch,
                    "step": step_index,
                    "global_step": trainer.global_step,
                    **stats,
                }
                trainer.global_step += 1
                for callback in self.callbacks:
                    callback.on_step_end(trainer, record)
                # The running means, set before the update that draws them (set after it,
                # they showed one step late, and the last step's never).
                if taken:
                    bar.set_postfix(
                        {k: f"{sums[k] / taken:.4g}" for k in shown if k in sums}, refresh=False
                    )
                bar.update(1)
        prefix = "meta_" if phase == "meta" else ""
        summary = {f"{prefix}{k}": v / taken if taken else math.nan for k, v in sums.items()}
        summary[f"{phase}_steps"] = count
        if count:
            summary[f"{prefix}skipped"] = count - taken
        return summary
