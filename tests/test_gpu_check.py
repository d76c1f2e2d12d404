"""Tests of ``benchmarks/gpu_check.py`` where no GPU is needed: the no-CUDA exit and the runner."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_the_script_says_so_and_exits_with_status_0():
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("SKIP gpu check: no CUDA device here")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer of a part")
@pytest.mark.parametrize("part", ["hypergradient", "steps-bf16", "nccl-torchrun"])
def test_each_part_skips_without_cuda(gpu_check, part):
    assert gpu_check.run_part(part, 10) == f"SKIP {part}: no CUDA device"


def test_failures_set_the_exit_status_and_are_counted(gpu_check):
    assert gpu_check.summary(["PASS a", "SKIP b"]) == (
        "gpu check: 1 passed, 0 failed, 1 skipped",
        0,
    )
    assert gpu_check.summary(["PASS a", "FAIL b: x", "FAIL c"])[1] == 1


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_a_timed_out_part_takes_the_processes_it_started_with_it(gpu_check, tmp_path):
    # A child that starts a grandchild (as torchrun starts its workers) and hangs.
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        gpu_check.run_in_own_group([sys.executable, "-c", code], {**os.environ}, timeout=5)
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the kill is sent; the process may take a moment to go
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{grandchild}/stat") as stat:  # a zombie is gone but for its entry
            if stat.read().split()[2] == "Z":
                break
        time.sleep(0.1)
    else:
        pytest.fail(f"the grandchild {grandchild} outlived the timeout")


def test_parts_get_their_limit_and_skip_once_the_budget_is_spent(gpu_check, capsys):
    calls = []

    def runner(name, timeout):
        calls.append((name, timeout))
        return f"PASS {name}"

    lines = gpu_check.run_parts(["hypergradient", "steps-compiled"], 1000, runner)
    assert lines == ["PASS hypergradient", "PASS steps-compiled"]
    assert [timeout for _, timeout in calls] == [
        gpu_check.PARTS["hypergradient"],
        gpu_check.PARTS["steps-compiled"],
    ]
    assert sum(gpu_check.PARTS.values()) <= 470  # the whole check within its 8 minutes
    lines = gpu_check.run_parts(["hypergradient", "fuse-1280x1024"], 5, runner)
    assert all(line.startswith("SKIP") and "budget of 5 s is spent" in line for line in lines)
    assert capsys.readouterr().out.count("\n") == 4


def test_a_part_that_overruns_its_limit_is_a_failure(gpu_check, monkeypatch):
    def overrun(command, environment, timeout):
        raise subprocess.TimeoutExpired(command, timeout)

    monkeypatch.setattr(gpu_check, "run_in_own_group", overrun)
    line = gpu_check.run_part_in_child("steps-fp32", 42)
    assert line == "FAIL steps-fp32: did not finish within 42 s"


def test_compiled_steps_still_compiling_at_their_limit_are_skipped_not_failed(
    gpu_check, monkeypatch
):
    printed = {"steps-compiled": "", "steps-fp32": ""}

    def overrun(command, environment, timeout):
        name = command[command.index("--part") + 1]
        raise subprocess.TimeoutExpired(command, timeout, output=printed[name])

    monkeypatch.setattr(gpu_check, "run_in_own_group", overrun)
    assert gpu_check.run_part_in_child("steps-compiled", 42).startswith(
        "SKIP steps-compiled: the first (compiling) steps did not finish within 42 s"
    )
    assert gpu_check.run_part_in_child("steps-fp32", 42).startswith("FAIL")
    # once compiled, a part that overruns is a failure like any other
    printed["steps-compiled"] = f"{gpu_check.WARMED_UP} steps-compiled 80.0 s\n"
    assert gpu_check.run_part_in_child("steps-compiled", 42) == (
        "FAIL steps-compiled: did not finish within 42 s"
    )


def test_part_limit_replaces_every_part_limit(gpu_check, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(
        gpu_check, "run_part_in_child", lambda name, timeout: calls.append(timeout) or "SKIP x"
    )
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        gpu_check.torch.cuda,
        "get_device_properties",
        lambda index: type("P", (), {"total_memory": 2**30})(),
    )
    monkeypatch.setattr(gpu_check.torch.cuda, "get_device_name", lambda index: "stand-in")
    gpu_check.main(["--only", "steps-compiled", "--part-limit", "300", "--budget", "500"])
    assert calls == [300]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is for machines without CUDA")
def test_the_dry_run_runs_every_part_on_the_cpu():
    # Everything but the compiled steps (inductor compiles for minutes on the CPU): the same
    # code as on a GPU, at small sizes, so that the script is checked before GPU time is spent.
    parts = ["hypergradient", "steps-fp32", "steps-bf16", "steps-lean", "fuse-1280x1024"]
    parts += ["resume", "nccl-torchrun"]
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--budget", "600", "--only", *parts],
        capture_output=True,
        text=True,
        timeout=660,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    for part in parts:
        assert any(line.startswith(f"PASS {part}:") for line in lines), (part, completed.stdout)
    assert "backend gloo, world size 2" in completed.stdout  # the data-parallel path ran
    assert lines[-1] == "gpu check: 7 passed, 0 failed, 0 skipped"


def test_a_bf16_hypergradient_far_from_float32s_fails_the_judged_check(gpu_check, monkeypatch):
    monkeypatch.setattr(gpu_check, "_bf16_cosine", lambda *args, **kwargs: 0.5)
    judged = gpu_check.DRY_RUN._replace(judged=True)
    line = gpu_check.check_steps("bf16", steps=1, setting=judged)
    assert line.startswith("FAIL steps-bf16:") and "cosine with fp32 0.50000" in line
    passing = gpu_check.BF16_COSINE_MIN + 0.005
    monkeypatch.setattr(gpu_check, "_bf16_cosine", lambda *args, **kwargs: passing)
    assert gpu_check.check_steps("bf16", steps=1, setting=judged).startswith("PASS steps-bf16:")
