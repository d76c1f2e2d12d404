"""tdfusion: task-driven multi-modal image fusion with a learnable fusion loss."""

from __future__ import annotations

__version__ = "0.1.0"
