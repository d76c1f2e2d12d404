"""``tdfusion demo``: a short run writes every promised output."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tdfusion.cli.demo import run_demo


def test_demo_writes_checkpoint_images_maps_curve_and_metrics(tmp_path):
    result = run_demo(tmp_path, device="cpu", epochs=1, meta_steps=1, progress=False)
    assert result["checkpoint"].is_file() and result["fusion_weights"].is_file()
    assert len(result["fused"]) == 4
    fused = np.asarray(Image.open(result["fused"][0]))
    assert fused.shape == (480, 640, 3)  # colour, at the input size
    assert len(result["weight_maps"]) == 8  # heat map and overlay per pair
    assert result["curve"] is not None and result["curve"].is_file()
    rows = result["metrics"].read_text().splitlines()
    assert rows[0].startswith("name,EN,") and len(rows) == 5
    for line in ("TDFusion demo finished", "checkpoint", "fused images", "loss weights"):
        assert line in result["text"]
