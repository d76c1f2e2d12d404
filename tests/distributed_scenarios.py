"""Training scenarios that ``tests/test_distributed.py`` runs in two processes under torchrun.

Run as ``torchrun --nproc_per_node=2 tests/distributed_scenarios.py OUT [elastic]``: every rank
trains with the gloo backend on the CPU and saves what it ends with to ``OUT/*-rank<R>.pt``.
The same functions run in one process (``world_size=1``) give the reference the test compares
with: one process given the concatenation of the ranks' batches.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tdfusion import LossGenerator, MetaFusionTrainer
from tdfusion.nets import ReFusionNet
from tdfusion.trainer import CSVLogger, LambdaCallback

#: Samples per rank in one batch of the step scenarios.
PER_RANK = 2
#: (hypergradient method, inner optimiser) combinations of the step scenarios.
STEP_CONFIGS = [(m, o) for m in ("forward", "backprop") for o in ("sgd", "adam")]
HEIGHT, WIDTH, CLASSES = 24, 20, 3


class PixelTask(nn.Module):
    """A trainable per-pixel classifier with a cross-entropy loss (no batch norm)."""

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(1) if batch_norm else nn.Identity()
        self.head = nn.Conv2d(1, CLASSES, 3, padding=1)

    def forward(self, fused: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(self.norm(fused)), target)


def make_data(count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` pairs (float64) and per-pixel labels that depend on source a."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(count, 1, HEIGHT, WIDTH, generator=generator, dtype=torch.float64)
    b = torch.rand(count, 1, HEIGHT, WIDTH, generator=generator, dtype=torch.float64)
    labels = (a[:, 0] * CLASSES).long().clamp(max=CLASSES - 1)
    return a, b, labels


def build_trainer(model_seed: int = 0, **options: Any) -> MetaFusionTrainer:
    """Tiny float64 F, G and T in a trainer with plain SGD updates of F and T."""
    torch.manual_seed(model_seed)
    fusion = ReFusionNet(dim=4, num_blocks=1, num_heads=2).double()
    generator = LossGenerator(dim=4, num_blocks=1, num_heads=2).double()
    task = PixelTask(options.pop("batch_norm", False)).double()
    settings: dict[str, Any] = {
        "inner_lr": 0.5,
        "task_inner_lr": 0.5,
        "fusion_lr": 0.05,
        "task_lr": 0.05,
        "generator_lr": 1e-2,
        "optimizer": "sgd",
        "fusion_crop": 16,
        "device": "cpu",
        "seed": 3,
    }
    settings.update(options)
    return MetaFusionTrainer(fusion, task, generator, **settings)


def snapshot(trainer: MetaFusionTrainer) -> dict[str, Any]:
    """Copies of F, G and T's states."""
    return {
        "fusion_model": {k: v.clone() for k, v in trainer.fusion_model.state_dict().items()},
        "loss_generator": {k: v.clone() for k, v in trainer.loss_generator.state_dict().items()},
        "task": {k: v.clone() for k, v in trainer.task_loss.state_dict().items()},
    }


def share(batch: tuple[torch.Tensor, ...], rank: int, world_size: int) -> tuple[torch.Tensor, ...]:
    """This rank's rows of a global batch (the whole batch in one process)."""
    size = batch[0].shape[0] // world_size
    return tuple(t[rank * size : (rank + 1) * size] for t in batch)


def steps_scenario(method: str, inner: str, rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Two meta steps and two fusion steps on fixed global batches of ``PER_RANK * 2``."""
    a, b, labels = make_data(6 * PER_RANK * 2)
    global_size = PER_RANK * 2
    batches = [
        share(
            (a[i : i + global_size], b[i : i + global_size], labels[i : i + global_size]),
            rank,
            world_size,
        )
        for i in range(0, a.shape[0], global_size)
    ]
    trainer = build_trainer(hypergradient_method=method, inner_optimizer=inner)
    stats = []
    for step in range(2):
        stats.append(trainer.meta_step(batches[2 * step], batches[2 * step + 1]))
        stats.append(trainer.fusion_step(batches[4 + step]))
    hypergradient = trainer.hypergradient(batches[0], batches[5])
    return {"state": snapshot(trainer), "stats": stats, "hypergradient": hypergradient}


class IndexedPairs(Dataset):
    """Pairs that remember which indices were read (data loading stays in this process)."""

    def __init__(self, count: int, seed: int = 0) -> None:
        self.a, self.b, self.labels = make_data(count, seed)
        self.seen: list[int] = []

    def __len__(self) -> int:
        return self.a.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.seen.append(int(index))
        return self.a[index], self.b[index], self.labels[index]


def fit_scenario(
    out: Path, batch_size: int, rank: int = 0, shuffle: bool = False
) -> dict[str, Any]:
    """``fit`` over 8 pairs; ranks start from different models (rank 0's must win)."""
    dataset = IndexedPairs(8)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(5) if shuffle else None,
    )
    trainer = build_trainer(model_seed=100 + rank)
    records: list[dict[str, Any]] = []
    name = "fit-shuffled" if shuffle else "fit"
    trainer.fit(
        loader,
        epochs=2,
        meta_steps=2,
        checkpoint=out / f"{name}-checkpoint.pt",
        callbacks=[
            CSVLogger(out / f"{name}-log.csv"),
            LambdaCallback(on_step_end=lambda _, stats: records.append(stats)),
        ],
    )
    return {"state": snapshot(trainer), "records": records, "seen": dataset.seen}


def shuffled_loader(dataset: IndexedPairs) -> DataLoader:
    """The seeded, shuffling loader (batch 1) of the resume and restart scenarios."""
    return DataLoader(
        dataset, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(11)
    )


def resume_scenario(out: Path) -> dict[str, Any]:
    """Shuffled ``fit``: two epochs straight, and one epoch + resume + one epoch."""
    straight_data = IndexedPairs(8)
    straight = build_trainer()
    straight.fit(shuffled_loader(straight_data), epochs=2, meta_steps=2, progress=False)

    checkpoint = out / "resume-checkpoint.pt"
    first = build_trainer()
    first.fit(shuffled_loader(IndexedPairs(8)), epochs=1, meta_steps=2, checkpoint=checkpoint)
    resumed = build_trainer()
    resumed.fit(shuffled_loader(IndexedPairs(8)), epochs=2, meta_steps=2, resume=checkpoint)
    return {
        "straight": snapshot(straight),
        "resumed": snapshot(resumed),
        "seen": straight_data.seen,
        "epoch": resumed.epoch,
    }


def elastic_scenario(out: Path) -> dict[str, Any]:
    """Rank 1 dies after the first epoch's checkpoint; torchrun restarts both, and they resume.

    Launched with ``torchrun --max-restarts=1``; the result must equal the uninterrupted run of
    :func:`resume_scenario` (the same loader, seeds and epochs).
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    checkpoint = out / "elastic-checkpoint.pt"

    def die_once(trainer: MetaFusionTrainer, summary: dict[str, Any]) -> None:
        if restart == 0 and trainer.epoch == 1 and trainer.rank == 1:
            os._exit(3)  # a hard crash: no clean-up, no exception handling

    trainer = build_trainer()
    trainer.fit(
        shuffled_loader(IndexedPairs(8)),
        epochs=2,
        meta_steps=2,
        checkpoint=checkpoint,
        resume=checkpoint if checkpoint.is_file() else None,
        callbacks=[LambdaCallback(on_epoch_end=die_once)],
        progress=False,
    )
    return {"state": snapshot(trainer), "restart": restart}


def nonfinite_scenario(rank: int, world_size: int) -> dict[str, Any]:
    """A NaN in rank 1's share only: every rank must skip the update (and none may hang)."""
    a, b, labels = make_data(4 * world_size)
    trainer = build_trainer(on_nonfinite="skip")
    before = snapshot(trainer)
    poisoned = a.clone()
    poisoned[world_size - 1, 0, 0, 0] = float("nan")  # in the last rank's share only
    batch = share((poisoned[:world_size], b[:world_size], labels[:world_size]), rank, world_size)
    other = share((a[world_size:], b[world_size:], labels[world_size:]), rank, world_size)
    fusion_stats = trainer.fusion_step(batch)
    meta_stats = trainer.meta_step(other, batch)
    return {
        "before": before,
        "after": snapshot(trainer),
        "skipped": [fusion_stats["skipped"], meta_stats["skipped"]],
    }


def batchnorm_scenario(rank: int, world_size: int) -> dict[str, Any]:
    """A task network with batch norm: its running statistics stay equal on all ranks."""
    a, b, labels = make_data(4 * world_size, seed=rank + 1)  # different data on every rank
    trainer = build_trainer(batch_norm=True)
    trainer.fusion_step((a, b, labels))
    trainer.fusion_step((b, a, labels))
    return {"state": snapshot(trainer)}


def error_scenarios(rank: int) -> dict[str, str]:
    """Errors every rank must raise together, with a message saying what to fix."""
    messages: dict[str, str] = {}
    try:
        build_trainer(inner_lr=0.5 + rank)
    except Exception as error:  # the message is what the test checks
        messages["different_settings"] = f"{type(error).__name__}: {error}"
    trainer = build_trainer()
    tiny = DataLoader(IndexedPairs(2), batch_size=1, shuffle=True)
    try:
        trainer.fit(tiny, epochs=1, meta_steps=1, progress=False)
    except Exception as error:  # the message is what the test checks
        messages["too_little_data"] = f"{type(error).__name__}: {error}"
    return messages


def main(out: Path, which: str = "all") -> None:
    import tdfusion.distributed as distributed

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if which == "elastic":
        torch.save(elastic_scenario(out), out / f"elastic-rank{rank}.pt")
        distributed.destroy_distributed()
        return
    results: dict[str, Any] = {}
    for method, inner in STEP_CONFIGS:
        results[f"steps-{method}-{inner}"] = steps_scenario(method, inner, rank, world_size)
    assert distributed.is_distributed(), "the trainer should have joined torchrun's group"
    results["fit"] = fit_scenario(out, batch_size=1, rank=rank)
    results["fit-shuffled"] = fit_scenario(out, batch_size=1, rank=rank, shuffle=True)
    results["resume"] = resume_scenario(out)
    results["nonfinite"] = nonfinite_scenario(rank, world_size)
    results["batchnorm"] = batchnorm_scenario(rank, world_size)
    results["errors"] = error_scenarios(rank)
    results["world_size"] = distributed.get_world_size()
    torch.save(results, out / f"results-rank{rank}.pt")
    distributed.destroy_distributed()


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]), *sys.argv[2:3])
    except Exception:
        traceback.print_exc()
        sys.exit(1)
