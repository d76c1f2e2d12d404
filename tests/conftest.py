"""Shared fixtures: the real sample data beside the checkout, seeded RNGs, one torch thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_shared_data() -> Path | None:
    override = os.environ.get("TDFUSION_SHARED_DATA")
    candidates = [Path(override)] if override else []
    candidates.append(REPO_ROOT.parent / "shared" / "data")
    for candidate in candidates:
        if (candidate / "MSRS" / "example").is_dir():
            return candidate
    return None


SHARED_DATA = _find_shared_data()
SHARED_DATA_REASON = (
    "the real sample data (../shared/data beside the checkout, or $TDFUSION_SHARED_DATA) is absent"
)


@pytest.fixture
def shared_data() -> Path:
    """Path of the real sample data; skips the test when it is not there."""
    if SHARED_DATA is None:
        pytest.skip(SHARED_DATA_REASON)
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use small tensors, for which one thread is fastest (no oversubscription)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def image_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A small deterministic pair of single-channel images in [0, 1], shape (2, 1, 24, 20)."""
    generator = torch.Generator().manual_seed(1234)
    a = torch.rand(2, 1, 24, 20, generator=generator)
    b = torch.rand(2, 1, 24, 20, generator=generator)
    return a, b
