"""Benchmark: how much each setting where tdfusion's default and the research code differ moves G.

Setting (the MSRS recipe, at initialisation): ReFusionNet F, LossGenerator G, SegFormer-b0 T
(9 classes), seed 0 for every network, fusion loss on one random 256x256 crop (the same offsets
in every variant), task input 240x320, a real MSRS pair fed in both orders as the meta-train
batch and another as the meta-test batch; segmentation masks painted from the shared detection
boxes (``_msrs_sample.py``). Every variant starts from the same weights and the same drop-path
draws; one setting is changed at a time from tdfusion's default, then all of them together (the
``research`` preset). For each, the script prints the cosine between the default's
hypergradient ``dL_t/dtheta_G`` and the variant's, and the ratio of their norms.

Two settings do not enter the hypergradient; their effect is measured on what they change:

- the generator update: the cosine between the first update of G by Adam on the raw
  hypergradient (the paper's optimiser) and the normalised update ``g / max|g|`` (both);
- the fusion-step order: the cosine between T's gradient in one fusion step when T sees F before
  its update (default) and after it (the research code).

Run from the repository root::

    python benchmarks/fidelity.py [--threads 2]

The last lines print the table of ``docs/howto/paper_settings.rst``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _msrs_sample import box_masks, load_pairs, resize_masks  # noqa: E402

TASK_SIZE = (240, 320)

#: One setting changed at a time: name -> (weighting, T' step, label resolution).
VARIANTS = {
    "default": ("linear", "sgd", "task"),
    "squared weights": ("squared", "sgd", "task"),
    "T' by T's own Adam": ("linear", "task_optimizer", "task"),
    "CE at label resolution": ("linear", "sgd", "full"),
    "all three (research preset)": ("squared", "task_optimizer_persistent", "full"),
}


def batches(data: Path):
    """Meta-train, meta-test and fusion batches: one pair in both orders, masks at 480x640."""
    pairs, masks = load_pairs(data, 3), box_masks(data, 3)
    return [
        (torch.cat([ir, vis]), torch.cat([vis, ir]), torch.cat([mask, mask]))
        for (ir, vis), mask in zip(pairs, masks)
    ]


def build(weighting: str, task_step: str, labels: str, preset: str | None = None):
    from tdfusion import LearnableFusionLoss, MetaFusionTrainer
    from tdfusion.nets import LossGenerator, ReFusionNet
    from tdfusion.tasks import SegmentationTask

    torch.manual_seed(0)
    fusion, generator = ReFusionNet(), LossGenerator()
    full = labels == "full"
    task = SegmentationTask(9, pad=not full, align_corners=full)
    keywords = dict(fusion_crop=256, task_size=TASK_SIZE, seed=0, device="cpu")
    if preset is not None:
        return MetaFusionTrainer.from_preset(preset, fusion, task, generator, **keywords)
    return MetaFusionTrainer(
        fusion,
        task,
        generator,
        LearnableFusionLoss(alpha=1.0, weighting=weighting),
        task_inner_optimizer=task_step,
        **keywords,
    )


def for_task(batch, labels: str):
    a, b, masks = batch
    return a, b, masks if labels == "full" else resize_masks(masks, TASK_SIZE)


def hypergradient(trainer, meta_train, meta_test) -> torch.Tensor:
    torch.manual_seed(1)  # the same SegFormer drop-path draws in every variant
    gradient = trainer.hypergradient(meta_train, meta_test)
    return torch.cat([g.flatten() for g in gradient.values()]).double()


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def generator_update_cosine(gradient: torch.Tensor) -> float:
    """Adam's first step on the raw hypergradient vs the normalised update."""
    parameter = torch.zeros_like(gradient, requires_grad=True)
    adam = torch.optim.Adam([parameter], lr=1e-4)
    parameter.grad = gradient.clone()
    adam.step()
    return cosine(-parameter.detach(), gradient / gradient.abs().max())


def fusion_order_cosine(batch) -> float:
    """T's gradient in one fusion step: F before its update vs after it."""
    gradients = []
    for order in ("simultaneous", "sequential"):
        trainer = build("linear", "sgd", "task")
        trainer.fusion_step_order = order
        task = trainer.task_loss
        captured = {}
        original_step = trainer.task_optimizer.step

        def capture(*args, _captured=captured, _step=original_step, _task=task, **kwargs):
            _captured["g"] = torch.cat([p.grad.flatten() for p in _task.parameters()])
            return _step(*args, **kwargs)

        trainer.task_optimizer.step = capture
        torch.manual_seed(2)
        trainer.fusion_step(for_task(batch, "task"))
        gradients.append(captured["g"].double())
    return cosine(*gradients)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", 2)))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta_train, meta_test, fusion_batch = batches(args.data)

    gradients = {}
    for name, (weighting, task_step, labels) in VARIANTS.items():
        trainer = build(weighting, task_step, labels)
        gradients[name] = hypergradient(
            trainer, for_task(meta_train, labels), for_task(meta_test, labels)
        )
    preset = build("", "", "full", preset="research")
    preset_gradient = hypergradient(
        preset, for_task(meta_train, "full"), for_task(meta_test, "full")
    )
    research = gradients["all three (research preset)"]
    print(
        "research preset (from_preset) vs the three settings by hand: max abs difference "
        f"{float((preset_gradient - research).abs().max()):.1e}"
    )

    default = gradients["default"]
    print(f"{'setting changed from the default':32s}  cosine with default  norm ratio")
    for name, gradient in gradients.items():
        if name == "default":
            continue
        ratio = float(gradient.norm() / default.norm())
        print(f"{name:32s}  {cosine(default, gradient):+19.4f}  {ratio:10.3f}")
    print(
        f"{'G update: Adam vs normalised':32s}  {generator_update_cosine(default):+19.4f}  "
        "(first update of G, default hypergradient)"
    )
    order = fusion_order_cosine(fusion_batch)
    print(
        f"{'fusion step: T after F update':32s}  {order:+19.4f}  "
        f"(T's gradient in one fusion step; 1 - cosine = {1 - order:.1e})"
    )


if __name__ == "__main__":
    main()
