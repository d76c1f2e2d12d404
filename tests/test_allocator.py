"""tdfusion.allocator: keeping freed CPU memory for reuse (glibc's malloc)."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import pytest

from tdfusion import allocator
from tdfusion.allocator import MAX_MMAP_THRESHOLD, keep_freed_memory
from tdfusion.cli.options import add_malloc_option, apply_malloc_option

GLIBC = platform.libc_ver()[0] == "glibc"

# In a fresh process (the setting is process-wide): six training steps of ReFusionNet on a
# 64x64 pair; the page faults of each step are counted.
FAULTS_PER_STEP = """
import json, resource, sys
import torch
if sys.argv[1] == "keep":
    from tdfusion.allocator import keep_freed_memory
    assert keep_freed_memory()
from tdfusion.nets import ReFusionNet
torch.manual_seed(0)
net = ReFusionNet()
a, b = torch.rand(2, 2, 1, 64, 64)
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(a, b).mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def faults_per_step(mode: str) -> list[int]:
    command = [sys.executable, "-c", FAULTS_PER_STEP, mode]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory acts on glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults() -> None:
    # With glibc's default, every step gives part of its freed activations back to the system
    # and faults them in again (about 18,000 pages a step here); kept memory is reused.
    system, kept = faults_per_step("system"), faults_per_step("keep")
    assert sum(kept[-3:]) * 5 < sum(system[-3:]), (kept, system)
    assert min(system[-3:]) > 1000, system


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"mmap_threshold": MAX_MMAP_THRESHOLD + 1}, "glibc's limit"),
        ({"top_pad": -1}, "top_pad must be a number of bytes"),
        ({"trim_threshold": 2**31}, r"trim_threshold must be a number of bytes in \[0, 2\*\*31"),
        ({"top_pad": 1.5}, "top_pad"),
        ({"mmap_threshold": True}, "mmap_threshold"),
    ],
)
def test_bad_sizes_are_refused_before_anything_changes(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        keep_freed_memory(**arguments)


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert keep_freed_memory() is False


def test_cli_applies_it_unless_asked_not_to(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    parser = argparse.ArgumentParser()
    add_malloc_option(parser)
    assert apply_malloc_option(parser.parse_args([])) is True
    assert apply_malloc_option(parser.parse_args(["--system-malloc"])) is False
    assert calls == [1]
