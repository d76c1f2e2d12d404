"""Distributed training: two CPU ranks under torchrun (gloo) against one process.

The multi-process runs are real ``torchrun`` launches of ``tests/distributed_scenarios.py`` and of
``python -m tdfusion train``, bounded in time; the reference is the same scenario run here in one
process with the ranks' batches concatenated.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import distributed_scenarios as scenarios
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdfusion import MetaFusionTrainer
from tdfusion import distributed as dist_utils
from tdfusion.errors import DistributedError
from tdfusion.nets import ReFusionNet

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 300

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this PyTorch build has no torch.distributed gloo backend",
)


def torchrun(
    *arguments: str, cwd: Path, processes: int = 2, restarts: int = 0
) -> subprocess.CompletedProcess:
    """Launch ``processes`` CPU ranks with torchrun; fail the test (not hang) past the timeout."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), str(REPO_ROOT / "tests"), environment.get("PYTHONPATH", "")]
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        f"--max-restarts={restarts}",
        *arguments,
    ]
    # A session of its own, so that a hang kills torchrun's workers too, not only torchrun.
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT} s: {stderr[-3000:]}")
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every scenario of ``distributed_scenarios`` run once on two ranks."""
    out = tmp_path_factory.mktemp("two-ranks")
    result = torchrun(str(REPO_ROOT / "tests" / "distributed_scenarios.py"), str(out), cwd=out)
    ranks = [torch.load(out / f"results-rank{rank}.pt", weights_only=True) for rank in range(2)]
    return {"ranks": ranks, "out": out, "output": result.stdout + result.stderr}


def largest_difference(first: dict[str, Any], second: dict[str, Any]) -> float:
    """Largest absolute difference over F, G and T's states (integer tensors must be equal)."""
    largest = 0.0
    for part in ("fusion_model", "loss_generator", "task"):
        assert first[part].keys() == second[part].keys(), part
        for name, value in first[part].items():
            other = second[part][name]
            if value.is_floating_point():
                largest = max(largest, float((value - other).abs().max()))
            else:
                assert torch.equal(value, other), f"{part}.{name}"
    return largest


# --------------------------------------------------------------------------- two ranks


@pytest.mark.parametrize(("method", "inner"), scenarios.STEP_CONFIGS)
def test_meta_and_fusion_steps_leave_all_ranks_identical(two_ranks, method, inner) -> None:
    rank0, rank1 = (r[f"steps-{method}-{inner}"] for r in two_ranks["ranks"])
    assert largest_difference(rank0["state"], rank1["state"]) == 0.0
    for name, gradient in rank0["hypergradient"].items():
        assert torch.equal(gradient, rank1["hypergradient"][name]), name
    assert rank0["stats"] == rank1["stats"]  # logged values are means over ranks


@pytest.mark.parametrize(("method", "inner"), scenarios.STEP_CONFIGS)
def test_two_ranks_with_batch_n_equal_one_process_with_batch_2n(two_ranks, method, inner) -> None:
    distributed = two_ranks["ranks"][0][f"steps-{method}-{inner}"]
    single = scenarios.steps_scenario(method, inner)  # one process, the concatenated batches
    initial = scenarios.snapshot(scenarios.build_trainer())
    moved = largest_difference(single["state"], initial)
    assert moved > 1e-3  # the steps changed F, G and T, so the comparison below means something
    assert largest_difference(distributed["state"], single["state"]) < 1e-12
    for name, gradient in single["hypergradient"].items():
        torch.testing.assert_close(
            distributed["hypergradient"][name], gradient, rtol=1e-9, atol=1e-12 * moved
        )
    for distributed_stats, single_stats in zip(distributed["stats"], single["stats"]):
        for key in ("fusion_loss", "task_loss", "weight_a_mean"):
            assert distributed_stats[key] == pytest.approx(single_stats[key], rel=1e-12)


@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
def test_fit_shards_the_data_and_equals_one_process_with_the_whole_batch(
    two_ranks, tmp_path, shuffle
) -> None:
    name = "fit-shuffled" if shuffle else "fit"
    rank0, rank1 = (r[name] for r in two_ranks["ranks"])
    # Each rank read its own half of the 8 pairs in every pass (2 epochs x (meta + fusion)).
    assert len(rank0["seen"]) == len(rank1["seen"]) == 2 * (4 + 4)
    for start in range(0, 16, 4):
        assert sorted(rank0["seen"][start : start + 4] + rank1["seen"][start : start + 4]) == list(
            range(8)
        )
    # Ranks started from different random models; rank 0's was broadcast, so they end equal.
    assert largest_difference(rank0["state"], rank1["state"]) == 0.0
    single = scenarios.fit_scenario(tmp_path, batch_size=2, rank=0, shuffle=shuffle)
    # The single process read, batch by batch, the union of what the two ranks read.
    for step in range(0, 16, 2):
        assert sorted(single["seen"][step : step + 2]) == sorted(
            [rank0["seen"][step // 2], rank1["seen"][step // 2]]
        )
    assert largest_difference(rank0["state"], single["state"]) < 1e-12
    assert [r["phase"] for r in rank0["records"]] == [r["phase"] for r in single["records"]]
    for distributed_record, single_record in zip(rank0["records"], single["records"]):
        assert distributed_record["task_loss"] == pytest.approx(single_record["task_loss"], 1e-12)


def test_only_rank_zero_writes_logs_checkpoints_and_progress(two_ranks) -> None:
    out = two_ranks["out"]
    with (out / "fit-log.csv").open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2 * (2 + 4)  # one rank's steps: 2 epochs of 2 meta + 4 fusion steps
    assert [int(r["global_step"]) for r in rows] == list(range(12))
    checkpoint = torch.load(out / "fit-checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    assert checkpoint["data"]["world_size"] == 2
    assert len(checkpoint["rng_per_rank"]) == 2
    final = two_ranks["ranks"][0]["fit"]["state"]
    for name, value in checkpoint["models"]["fusion_model"].items():
        assert torch.equal(value, final["fusion_model"][name]), name
    # The epoch lines of the two fit scenarios and of the resumed run: once each, from rank 0.
    assert two_ranks["output"].count("epoch 2/2: meta task") == 3


def test_distributed_resume_equals_an_uninterrupted_run(two_ranks) -> None:
    for rank in two_ranks["ranks"]:
        assert rank["resume"]["epoch"] == 2
        assert largest_difference(rank["resume"]["straight"], rank["resume"]["resumed"]) == 0.0
    first, second = (r["resume"]["seen"] for r in two_ranks["ranks"])
    # 2 epochs x (meta + fusion pass) of 4 pairs per rank: each pass is a fresh shuffle, and
    # within a pass the two ranks' shares are disjoint.
    passes = [(first[i : i + 4], second[i : i + 4]) for i in range(0, 16, 4)]
    assert len(first) == len(second) == 16
    for mine, theirs in passes:
        assert sorted(mine + theirs) == list(range(8))
    assert len({tuple(mine) for mine, _ in passes}) > 1


def test_a_crashed_rank_is_restarted_by_torchrun_and_training_resumes(two_ranks, tmp_path) -> None:
    script = str(REPO_ROOT / "tests" / "distributed_scenarios.py")
    result = torchrun(script, str(tmp_path), "elastic", cwd=tmp_path, restarts=1)
    assert "failed (exitcode: 3) local_rank: 1" in result.stderr  # the first attempt crashed
    uninterrupted = two_ranks["ranks"][0]["resume"]["straight"]
    for rank in range(2):
        restarted = torch.load(tmp_path / f"elastic-rank{rank}.pt", weights_only=True)
        assert restarted["restart"] == 1  # the results come from the second attempt
        assert largest_difference(restarted["state"], uninterrupted) == 0.0


def test_a_nonfinite_loss_on_one_rank_skips_the_update_on_every_rank(two_ranks) -> None:
    for rank in two_ranks["ranks"]:
        result = rank["nonfinite"]
        assert result["skipped"] == [1.0, 1.0]
        assert largest_difference(result["before"], result["after"]) == 0.0


def test_batch_norm_statistics_stay_equal_across_ranks(two_ranks) -> None:
    rank0, rank1 = (r["batchnorm"]["state"] for r in two_ranks["ranks"])
    assert largest_difference(rank0, rank1) == 0.0
    assert float(rank0["task"]["norm.running_mean"]) != 0.0  # the statistics were updated


def test_wrong_settings_and_too_many_ranks_give_clear_errors(two_ranks) -> None:
    for rank in two_ranks["ranks"]:
        errors = rank["errors"]
        assert errors["different_settings"].startswith("DistributedError: ")
        assert "inner_lr=" in errors["different_settings"]
        assert "same settings" in errors["different_settings"]
        assert errors["too_little_data"].startswith("DistributedError: with 2 ranks")
        assert "a meta step needs two" in errors["too_little_data"]


@pytest.mark.slow
def test_tdfusion_train_runs_under_torchrun_and_resumes(tmp_path) -> None:
    out = tmp_path / "run"
    common = ["-m", "tdfusion", "train", "--recipe", "msrs-segmentation", "--smoke"]
    result = torchrun(*common, "--out", str(out), cwd=tmp_path)
    assert result.stdout.count("trained msrs-segmentation for 1 epoch(s) on cpu x 2 processes") == 1
    assert json.loads((out / "recipe.json").read_text())["name"] == "msrs-segmentation"
    assert (out / "fusion_model.pt").is_file() and (out / "loss_generator.pt").is_file()
    with (out / "training_log.csv").open() as stream:
        assert len(list(csv.DictReader(stream))) == 1 + 2  # 1 meta + 2 fusion steps, rank 0 only
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["data"]["world_size"] == 2 and checkpoint["epoch"] == 1

    # A rerun with more epochs resumes from the checkpoint in distributed mode.
    result = torchrun(*common, "--epochs", "2", "--out", str(out), cwd=tmp_path)
    assert "trained msrs-segmentation for 2 epoch(s)" in result.stdout
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    with (out / "training_log.csv").open() as stream:
        assert len(list(csv.DictReader(stream))) == 2 * (1 + 2)


# --------------------------------------------------------------------------- one process


def test_without_torchrun_everything_describes_a_world_of_one(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not dist_utils.launched_distributed()
    assert not dist_utils.is_distributed()
    assert (dist_utils.get_rank(), dist_utils.get_world_size()) == (0, 1)
    assert dist_utils.init_distributed() is False
    tensor = torch.tensor([1.5])
    dist_utils.all_reduce_mean_([tensor])
    assert tensor.item() == 1.5
    trainer = MetaFusionTrainer(ReFusionNet(dim=4, num_blocks=1, num_heads=2), nn.MSELoss())
    assert (trainer.distributed, trainer.rank, trainer.world_size) == (False, 0, 1)
    assert trainer.is_main_process


def test_distributed_true_outside_torchrun_says_how_to_launch(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(DistributedError, match="torchrun --nproc_per_node"):
        MetaFusionTrainer(
            ReFusionNet(dim=4, num_blocks=1, num_heads=2), nn.MSELoss(), distributed=True
        )


def torchrun_environment(monkeypatch, **values: str) -> None:
    defaults = {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29999",
    }
    for name, value in {**defaults, **values}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"MASTER_ADDR": None, "MASTER_PORT": None}, "missing MASTER_ADDR, MASTER_PORT"),
        ({"RANK": "2"}, "RANK=2 is outside the world of WORLD_SIZE=2"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ],
)
def test_a_broken_torchrun_environment_is_named(monkeypatch, environment, message) -> None:
    torchrun_environment(monkeypatch, **environment)
    with pytest.raises(DistributedError, match=message):
        dist_utils.init_distributed(device="cpu")


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("nccl", "nccl backend all-reduces CUDA tensors only, but this rank trains on cpu"),
        ("carrier-pigeon", "unknown torch.distributed backend 'carrier-pigeon'"),
    ],
)
def test_a_backend_that_does_not_fit_the_device_is_refused(monkeypatch, backend, message) -> None:
    torchrun_environment(monkeypatch)
    with pytest.raises(DistributedError, match=message):
        dist_utils.init_distributed(backend=backend, device="cpu")
    assert not torch.distributed.is_initialized()


def test_more_processes_than_gpus_on_a_node_is_refused(monkeypatch) -> None:
    torchrun_environment(monkeypatch, LOCAL_RANK="1", LOCAL_WORLD_SIZE="9")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        DistributedError, match="9 processes were started on this node but it has 1"
    ):
        dist_utils.rank_device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist_utils.rank_device("cuda") == torch.device("cuda", 1)
    with pytest.warns(UserWarning, match="LOCAL_RANK=1 of 9 on this node trains on cuda:0"):
        assert dist_utils.rank_device("cuda:0") == torch.device("cuda", 0)  # explicit index kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dist_utils.rank_device("cuda:1") == torch.device("cuda", 1)  # its own: no warning


def test_a_group_formed_without_torchrun_gives_each_rank_its_own_gpu(monkeypatch) -> None:
    from tdfusion.distributed import process

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(process, "is_distributed", lambda: True)  # e.g. torch.multiprocessing
    monkeypatch.setattr(process, "get_rank", lambda: 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dist_utils.rank_device("cuda") == torch.device("cuda", 1)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_fusion_phase_optimizer_can_be_chosen(optimizer) -> None:
    trainer = MetaFusionTrainer(
        ReFusionNet(dim=4, num_blocks=1, num_heads=2), nn.MSELoss(), optimizer=optimizer
    )
    expected = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    assert type(trainer.fusion_optimizer) is expected
    assert trainer.config()["optimizer"] == optimizer
    a, b = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    before = [p.clone() for p in trainer.fusion_model.parameters()]
    trainer.fusion_step((a, b, a))
    if optimizer == "sgd":  # one plain SGD step: theta - lr * grad
        for old, new in zip(before, trainer.fusion_model.parameters()):
            torch.testing.assert_close(new, old - trainer.fusion_lr * new.grad)


def test_an_unknown_optimizer_name_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer must be one of"):
        MetaFusionTrainer(
            ReFusionNet(dim=4, num_blocks=1, num_heads=2), nn.MSELoss(), optimizer="rmsprop"
        )


def test_a_custom_optimizer_factory_is_used() -> None:
    def factory(parameters, lr):
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9)

    trainer = MetaFusionTrainer(
        ReFusionNet(dim=4, num_blocks=1, num_heads=2), nn.MSELoss(), optimizer=factory
    )
    assert trainer.fusion_optimizer.param_groups[0]["momentum"] == 0.9
    assert "optimizer" not in trainer.config()  # a factory cannot be saved; pass it to load()


def test_a_non_dataloader_iterable_is_trained_as_given_in_one_process() -> None:
    data = TensorDataset(
        torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)
    )
    batches = list(DataLoader(data, batch_size=2))
    trainer = MetaFusionTrainer(ReFusionNet(dim=4, num_blocks=1, num_heads=2), nn.MSELoss())
    assert trainer._shard_loader(batches, meta_steps=1) is batches
    trainer.fit(batches, epochs=1, meta_steps=1, progress=False)
    assert trainer.data_passes == 2  # one meta pass and one fusion pass


def test_shard_loader_splits_a_shuffled_pass_into_disjoint_shares() -> None:
    loader = DataLoader(list(range(10)), batch_size=2, shuffle=True)
    shards = [dist_utils.shard_loader(loader, num_replicas=2, rank=r, seed=4) for r in range(2)]
    for pass_index in range(2):
        seen = []
        for shard in shards:
            shard.sampler.set_epoch(pass_index)
            seen.append([int(i) for batch in shard for i in batch])
        assert sorted(seen[0] + seen[1]) == list(range(10))
        assert len(seen[0]) == len(seen[1]) == 5
    whole = dist_utils.shard_loader(loader, num_replicas=1, rank=0, seed=4)
    assert sorted(int(i) for batch in whole for i in batch) == list(range(10))


@pytest.mark.parametrize(
    "loader",
    [
        DataLoader(list(range(8)), sampler=torch.utils.data.RandomSampler(range(8), True)),
        DataLoader(list(range(8)), batch_sampler=[[0, 1], [2, 3]]),
        DataLoader(list(range(8)), sampler=torch.utils.data.SubsetRandomSampler(range(4))),
    ],
    ids=["with-replacement", "batch-sampler", "custom-sampler"],
)
def test_shard_loader_refuses_what_it_cannot_shard(loader) -> None:
    with pytest.raises(DistributedError, match="give it a .*DistributedSampler yourself"):
        dist_utils.shard_loader(loader, num_replicas=2, rank=0, seed=0)
    assert not dist_utils.shuffles_plainly(loader)
