"""fit: the meta phase draws from random streams of its own, so the fusion phase's batches,
their order and their crops do not depend on how many meta steps were taken."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import pytest
import torch
from test_trainer import make_trainer
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from tdfusion.trainer.checkpoint import load_checkpoint
from tdfusion.trainer.streams import SEARCH_LIMIT, dataset_generators, loader_generators


def numbered_loader(seed: int = 5, pairs: int = 6) -> DataLoader:
    """Pairs whose first pixel is their index, so a batch says which pairs it holds."""
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(pairs, 1, 12, 12, generator=generator, dtype=torch.float64)
    a[:, 0, 0, 0] = torch.arange(pairs, dtype=torch.float64) / 100
    b = torch.rand(pairs, 1, 12, 12, generator=generator, dtype=torch.float64)
    masks = torch.randint(0, 3, (pairs, 12, 12), generator=generator)
    return DataLoader(
        TensorDataset(a, b, masks),
        batch_size=2,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


def record_fusion_steps(trainer) -> list[tuple[list[int], bytes]]:
    """Each fusion step's pairs and the state of the generator its crop is drawn from."""
    seen: list[tuple[list[int], bytes]] = []
    fusion_step = trainer.fusion_step

    def recording(batch):
        pairs = (batch[0][:, 0, 0, 0] * 100).round().long().tolist()
        seen.append((pairs, bytes(trainer.generator.get_state().numpy())))
        return fusion_step(batch)

    trainer.fusion_step = recording
    return seen


def test_fusion_phase_sees_the_same_batches_and_crops_with_and_without_meta_steps():
    with_meta = make_trainer("module", fusion_crop=8, seed=3)
    without_meta = make_trainer("module", fusion_crop=8, seed=3)
    seen_with, seen_without = record_fusion_steps(with_meta), record_fusion_steps(without_meta)
    with_meta.fit(numbered_loader(), epochs=2, meta_steps=4, progress=False)
    without_meta.fit(numbered_loader(), epochs=2, meta_steps=0, progress=False)
    assert len(seen_with) == len(seen_without) == 6
    assert seen_with == seen_without
    # the data passes are still shuffled anew: the two epochs' orders differ
    assert [p for p, _ in seen_with[:3]] != [p for p, _ in seen_with[3:]]
    assert with_meta.meta_passes == 8 and without_meta.meta_passes == 0  # a meta step a pass
    assert with_meta.data_passes == without_meta.data_passes == 2


def test_the_meta_phase_reads_its_own_order_not_the_fusion_phase_s():
    pairs = 24
    trainer = make_trainer("module", fusion_crop=8, seed=3)
    fusion_seen = record_fusion_steps(trainer)
    meta_seen = []
    meta_step = trainer.meta_step

    def recording(meta_train, meta_test):
        for batch in (meta_train, meta_test):
            meta_seen.append((batch[0][:, 0, 0, 0] * 100).round().long().tolist())
        return meta_step(meta_train, meta_test)

    trainer.meta_step = recording
    trainer.fit(numbered_loader(pairs=pairs), epochs=1, meta_steps=6, progress=False)
    fusion_order = [pair for pairs_seen, _ in fusion_seen for pair in pairs_seen]
    meta_order = [pair for batch in meta_seen for pair in batch]
    assert sorted(meta_order) == sorted(fusion_order) == list(range(pairs))  # one pass each
    assert meta_order != fusion_order


def test_meta_steps_draw_crops_from_their_own_generator():
    trainer = make_trainer("module", fusion_crop=8, seed=3)
    batch = next(iter(numbered_loader()))
    fusion_state = trainer.generator.get_state()
    meta_state = trainer.meta_generator.get_state()
    trainer.meta_step(batch, batch)
    assert torch.equal(trainer.generator.get_state(), fusion_state)
    assert not torch.equal(trainer.meta_generator.get_state(), meta_state)
    # both streams come from the seed: another trainer with it starts the same
    again = make_trainer("module", fusion_crop=8, seed=3)
    assert torch.equal(again.meta_generator.get_state(), meta_state)
    assert not torch.equal(again.meta_generator.get_state(), again.generator.get_state())


def test_hypergradient_leaves_the_meta_generator_as_it_was():
    trainer = make_trainer("module", fusion_crop=8, seed=3)
    batch = next(iter(numbered_loader()))
    state = trainer.meta_generator.get_state()
    trainer.hypergradient(batch, batch)
    assert torch.equal(trainer.meta_generator.get_state(), state)


def test_a_checkpoint_without_the_meta_streams_still_resumes(tmp_path):
    """Checkpoints written before the meta phase had streams of its own resume, with the
    meta streams as seeded."""
    trainer = make_trainer("module", fusion_crop=8, seed=3)
    trainer.fit(
        numbered_loader(), epochs=1, meta_steps=2, checkpoint=tmp_path / "new.pt", progress=False
    )
    state = load_checkpoint(tmp_path / "new.pt")
    assert state["data"]["meta_passes"] == 2 and len(state["rng"]["meta_generators"]) == 5
    del state["rng"]["meta_generators"], state["data"]["meta_passes"]
    torch.save(state, tmp_path / "old.pt")
    resumed = make_trainer("module", fusion_crop=8, seed=3)
    resumed.fit(
        numbered_loader(), epochs=2, meta_steps=2, resume=tmp_path / "old.pt", progress=False
    )
    assert resumed.epoch == 2 and resumed.meta_passes == 2  # counted from 0 again


def test_a_loader_that_cannot_be_rebuilt_is_shared_by_both_phases():
    batches = list(numbered_loader())
    trainer = make_trainer("module", fusion_crop=8, seed=3)
    trainer.fit(batches, epochs=1, meta_steps=2, progress=False)
    # two meta passes (three batches make one pair each) and one fusion pass, one counter
    assert trainer.meta_passes == 0 and trainer.data_passes == 3


class AugmentedPairs(torch.utils.data.Dataset):
    """Six numbered 14 x 14 pairs, cropped to 12 and flipped by seeded random transforms."""

    def __init__(self) -> None:
        from tdfusion.data import Compose, RandomCrop, RandomFlip

        generator = torch.Generator().manual_seed(0)
        self.a = torch.rand(6, 1, 14, 14, generator=generator, dtype=torch.float64)
        self.b = torch.rand(6, 1, 14, 14, generator=generator, dtype=torch.float64)
        self.masks = torch.randint(0, 3, (6, 14, 14), generator=generator)
        self.transform = Compose(
            [
                RandomCrop(12, generator=torch.Generator().manual_seed(7)),
                RandomFlip(generator=torch.Generator().manual_seed(8)),
            ]
        )

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, index: int):
        return self.transform((self.a[index], self.b[index], self.masks[index]))


def augmented_loader(num_workers: int = 0, shuffle: bool = True) -> DataLoader:
    return DataLoader(
        AugmentedPairs(),
        batch_size=2,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(5),
    )


def shared_loader(kind: str) -> DataLoader:
    """Loaders that fit cannot rebuild as a twin, whose order comes from generators of their
    own: both phases read them."""
    dataset = AugmentedPairs()
    generator = torch.Generator().manual_seed(5)
    if kind == "batch-sampler":
        batches = BatchSampler(RandomSampler(dataset, generator=generator), 2, drop_last=False)
        return DataLoader(dataset, batch_sampler=batches)
    sampler = RandomSampler(dataset, replacement=True, num_samples=6, generator=generator)
    return DataLoader(dataset, batch_size=2, sampler=sampler)


def fusion_batches(meta_steps: int, shared: str | None = None, **loader_options):
    trainer = make_trainer("module", fusion_crop=8, seed=3)
    seen = []
    fusion_step = trainer.fusion_step

    def recording(batch):
        seen.append(batch[0].clone())
        return fusion_step(batch)

    trainer.fusion_step = recording
    torch.manual_seed(1)
    loader = augmented_loader(**loader_options) if shared is None else shared_loader(shared)
    trainer.fit(loader, epochs=2, meta_steps=meta_steps, progress=False)
    return seen


@pytest.mark.parametrize(
    "loader_options",
    [{}, {"shuffle": False}, {"num_workers": 2}],
    ids=["in-process", "in-order", "workers"],
)
def test_the_fusion_phase_augments_alike_with_and_without_meta_steps(loader_options):
    """Random transforms drawn in this process (or in workers) by the meta phase must not
    shift the fusion phase's."""
    without, with_meta = fusion_batches(0, **loader_options), fusion_batches(3, **loader_options)
    assert len(without) == len(with_meta) == 6
    for expected, seen in zip(without, with_meta):
        assert torch.equal(seen, expected)


@pytest.mark.parametrize("kind", ["batch-sampler", "sampler"])
def test_a_shared_loader_with_generators_of_its_own_keeps_the_phases_apart(kind):
    """Read by both phases, such a loader's order generators are swapped per phase too."""
    without, with_meta = fusion_batches(0, shared=kind), fusion_batches(3, shared=kind)
    assert len(without) == len(with_meta) == 6
    for expected, seen in zip(without, with_meta):
        assert torch.equal(seen, expected)


def parameters_after(trainer) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.clone()
        for name in ("fusion_model", "loss_generator", "task_loss")
        for key, value in getattr(trainer, name).state_dict().items()
    }


def test_resume_is_exact_with_random_transforms_read_in_this_process(tmp_path):
    torch.manual_seed(123)
    straight = make_trainer("module", fusion_crop=8, seed=11)
    straight.fit(augmented_loader(), epochs=3, meta_steps=2, progress=False)
    torch.manual_seed(123)
    first = make_trainer("module", fusion_crop=8, seed=11)
    first.fit(
        augmented_loader(), epochs=1, meta_steps=2, checkpoint=tmp_path / "c.pt", progress=False
    )
    torch.manual_seed(999)
    resumed = make_trainer("module", fusion_crop=8, seed=0)
    resumed.fit(
        augmented_loader(), epochs=3, meta_steps=2, resume=tmp_path / "c.pt", progress=False
    )
    expected = parameters_after(straight)
    for key, value in parameters_after(resumed).items():
        assert torch.equal(value, expected[key]), key


def test_two_fits_of_one_trainer_continue_like_one(tmp_path):
    """The meta phase's twin loader keeps its generator between fit calls."""
    torch.manual_seed(123)
    straight = make_trainer("module", fusion_crop=8, seed=11)
    straight.fit(augmented_loader(num_workers=2), epochs=2, meta_steps=2, progress=False)
    torch.manual_seed(123)
    twice = make_trainer("module", fusion_crop=8, seed=11)
    loader = augmented_loader(num_workers=2)
    twice.fit(loader, epochs=1, meta_steps=2, progress=False)
    twice.fit(loader, epochs=2, meta_steps=2, progress=False)
    expected = parameters_after(straight)
    for key, value in parameters_after(twice).items():
        assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("loader", [augmented_loader, lambda: shared_loader("batch-sampler")])
def test_resume_is_exact_with_a_custom_batch_sampler(tmp_path, loader):
    """The generator of a custom batch sampler's sampler is in the checkpoint too."""
    torch.manual_seed(123)
    straight = make_trainer("module", fusion_crop=8, seed=11)
    straight.fit(loader(), epochs=3, meta_steps=2, progress=False)
    torch.manual_seed(123)
    first = make_trainer("module", fusion_crop=8, seed=11)
    first.fit(loader(), epochs=1, meta_steps=2, checkpoint=tmp_path / "c.pt", progress=False)
    torch.manual_seed(999)
    resumed = make_trainer("module", fusion_crop=8, seed=0)
    resumed.fit(loader(), epochs=3, meta_steps=2, resume=tmp_path / "c.pt", progress=False)
    expected = parameters_after(straight)
    for key, value in parameters_after(resumed).items():
        assert torch.equal(value, expected[key]), key


def test_loader_generators_lists_each_generator_once_in_fixed_places():
    generator = torch.Generator()
    dataset = TensorDataset(torch.zeros(4))
    sampler = RandomSampler(dataset, generator=generator)
    plain = DataLoader(dataset, batch_size=2, sampler=sampler)
    # the default batch sampler holds the same sampler: its generator is listed once
    assert loader_generators(plain) == [None, generator, None, None]
    custom = DataLoader(dataset, batch_sampler=BatchSampler(sampler, 2, drop_last=False))
    assert loader_generators(custom) == [None, None, None, generator]


class _Slotted:
    __slots__ = ("__hidden", "visible")

    def __init__(self, generator: torch.Generator) -> None:
        self.__hidden = generator
        self.visible = 1


def _random_shift(image, generator):
    return image


def _closure_over(generator):
    def transform(image):
        return image + torch.rand(1, generator=generator)

    return transform


class _Holder:
    def __init__(self, value) -> None:
        self.value = value


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, **attributes) -> None:
        self.__dict__.update(attributes)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index):
        return index


@pytest.mark.parametrize(
    "where",
    ["partial", "closure", "slots", "long-list", "deep", "bound-method"],
)
def test_dataset_generators_finds_generators_where_transforms_keep_them(where):
    generator = torch.Generator()
    held = {
        "partial": lambda: functools.partial(_random_shift, generator=generator),
        "closure": lambda: _closure_over(generator),
        "slots": lambda: _Slotted(generator),
        "long-list": lambda: [_Holder(None) for _ in range(100)] + [_Holder(generator)],
        "deep": lambda: functools.reduce(lambda inner, _: _Holder(inner), range(9), generator),
        "bound-method": lambda: _Holder(generator).__init__,
    }[where]()
    found = dataset_generators(DataLoader(_Dataset(transform=held)))
    assert len(found) == 1 and found[0] is generator


def test_dataset_generators_reads_long_file_lists_quietly_and_warns_at_its_limit():
    files = {f"{i:06d}": (Path(f"ir/{i}.png"), Path(f"vi/{i}.png")) for i in range(30_000)}
    generator = torch.Generator()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = dataset_generators(DataLoader(_Dataset(files=files, transform=[generator])))
    assert found == [generator]
    records = [_Holder(i) for i in range(SEARCH_LIMIT + 10)]
    with pytest.warns(UserWarning, match="stopped after"):
        dataset_generators(DataLoader(_Dataset(records=records)))


def test_the_progress_bar_shows_the_means_up_to_the_last_step(monkeypatch):
    from tqdm.auto import tqdm

    import tdfusion.trainer.loop as loop

    drawn: list[tuple[int, str]] = []

    class Recording(tqdm):  # what each update draws: the count and the losses beside it
        def update(self, n=1):
            result = super().update(n)
            drawn.append((self.n, self.postfix or ""))
            return result

    monkeypatch.setattr(loop, "tqdm", Recording)
    trainer = make_trainer("module", fusion_crop=8, seed=3)
    trainer.fit(numbered_loader(), epochs=1, meta_steps=0, progress=True)
    count, postfix = drawn[-1]
    means = trainer.history[-1]
    assert count == 3
    assert f"fusion_loss={means['fusion_loss']:.4g}" in postfix
    assert f"task_loss={means['task_loss']:.4g}" in postfix
