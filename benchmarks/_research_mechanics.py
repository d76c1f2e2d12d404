"""The research code's meta-step mechanics, re-implemented as the benchmark baseline.

What makes the research code's meta step slow and leaky, reproduced on the same networks:

- the inner step back-propagates the fusion loss with ``.backward(create_graph=True)`` into every
  parameter's ``.grad`` (F's and G's), which keeps a graph that references the parameters
  themselves (a reference cycle that the garbage collector frees late, so memory grows);
- the fast weights ``theta - lr * theta.grad`` are written into the modules (the parameters are
  replaced by the non-leaf tensors for the outer forward, then put back);
- the task network's one-step clone is an ordinary optimiser step on the real network, which is
  saved to disk before and reloaded from disk after every meta step;
- the fused image for the task clone is computed with autograd on and then detached.

By default the networks are tdfusion's (ReFusionNet, LossGenerator and the task module
given), run as tdfusion runs them: this is the research code's *mechanics* on tdfusion's
networks, and only the mechanics differ from :class:`tdfusion.MetaFusionTrainer`; the networks,
the losses, the crops and the task input are the same. With ``network="research"``, ``F`` and
``G`` run the research code's way (``_research_network.py``: the same parameters and
outputs, computed as the research implementation computes them), which makes the whole step a
rebuild of the research code's. With
``weighting="squared"``, a task module built as ``SegmentationTask(..., pad=False,
align_corners=True)`` and masks at the full label size, it also does the research code's work
(``T`` is always adapted by its own Adam, as in the research code).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from _research_network import research_forward, research_generator_forward
from torch import nn

from tdfusion.losses import learnable_fusion_loss


@contextlib.contextmanager
def fast_weights_written_into(module: nn.Module, fast: dict[str, torch.Tensor]) -> Iterator[None]:
    """Replace the named parameters of ``module`` by plain tensors for the duration of a block."""
    originals = {}
    for name, tensor in fast.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        originals[name] = (owner, attribute, owner._parameters.pop(attribute))
        setattr(owner, attribute, tensor)
    try:
        yield
    finally:
        for owner, attribute, parameter in originals.values():
            delattr(owner, attribute)
            owner._parameters[attribute] = parameter


class ResearchMechanics:
    """Meta and fusion steps done the research code's way (see the module docstring)."""

    def __init__(
        self,
        fusion: nn.Module,
        generator: nn.Module,
        task: nn.Module,
        *,
        inner_lr: float = 1e-4,
        lr: float = 1e-4,
        fusion_crop: int = 256,
        task_size: tuple[int, int] = (240, 320),
        weighting: str = "linear",
        network: str = "tdfusion",
    ) -> None:
        if network not in ("tdfusion", "research"):
            raise ValueError(f"network must be 'tdfusion' or 'research', got {network!r}")
        self.fusion, self.generator, self.task = fusion, generator, task
        if network == "research":
            self.fuse = lambda a, b: research_forward(fusion, a, b)
            self.weigh = lambda a, b: research_generator_forward(generator, a, b)
        else:
            self.fuse, self.weigh = fusion, generator
        self.inner_lr, self.lr = inner_lr, lr
        self.fusion_crop, self.task_size = fusion_crop, task_size
        self.weighting = weighting
        self.fusion_optimizer = torch.optim.Adam(fusion.parameters(), lr=lr)
        self.task_optimizer = torch.optim.Adam(task.parameters(), lr=lr)
        self.generator_optimizer = torch.optim.Adam(generator.parameters(), lr=lr)
        self.folder = tempfile.mkdtemp(prefix="research-mechanics-")
        self.crop_rng = torch.Generator().manual_seed(0)

    def _crop(self, a, b):
        height, width = a.shape[-2:]
        top = int(torch.randint(height - self.fusion_crop + 1, (1,), generator=self.crop_rng))
        left = int(torch.randint(width - self.fusion_crop + 1, (1,), generator=self.crop_rng))
        window = (
            slice(None),
            slice(None),
            slice(top, top + self.fusion_crop),
            slice(left, left + self.fusion_crop),
        )
        return a[window], b[window]

    def _resize(self, image):
        return F.interpolate(image, size=self.task_size, mode="bilinear", align_corners=False)

    def meta_step(self, meta_train, meta_test) -> float:
        """One meta step: ``G``'s gradient, its normalised update, ``T`` reloaded from disk."""
        interim = os.path.join(self.folder, "interim_task.pth")
        torch.save(self.task.state_dict(), interim)
        task_loss = self._generator_gradient(meta_train, meta_test)
        with torch.no_grad():  # the normalised generator update
            largest = max(float(p.grad.abs().max()) for p in self.generator.parameters())
            if largest > 0:
                for p in self.generator.parameters():
                    p.add_(-self.lr * p.grad / largest)
        self.task.load_state_dict(torch.load(interim, weights_only=True))
        return task_loss

    def hypergradient(self, meta_train, meta_test) -> dict[str, torch.Tensor]:
        """``G``'s gradient as :meth:`meta_step` computes it, without the update (for checks).

        ``T`` is put back as the meta step puts it back; its optimiser's state advances.
        """
        interim = os.path.join(self.folder, "interim_task.pth")
        torch.save(self.task.state_dict(), interim)
        self._generator_gradient(meta_train, meta_test)
        self.task.load_state_dict(torch.load(interim, weights_only=True))
        return {n: p.grad.detach().clone() for n, p in self.generator.named_parameters()}

    def _generator_gradient(self, meta_train, meta_test) -> float:
        """The inner step (F's fast weights, T's optimiser step) and the outer backward into
        ``G``'s ``.grad``; returns the outer task loss."""
        a, b, target = meta_train
        self.fusion_optimizer.zero_grad()
        self.task_optimizer.zero_grad()
        self.generator_optimizer.zero_grad()

        crop_a, crop_b = self._crop(a, b)
        fused = self.fuse(crop_a, crop_b)
        weights = self.weigh(crop_a, crop_b)
        fusion_loss = learnable_fusion_loss(
            fused, crop_a, crop_b, weights, weighting=self.weighting
        )
        fusion_loss.backward(create_graph=True, retain_graph=True)
        fast = {n: p - self.inner_lr * p.grad for n, p in self.fusion.named_parameters()}

        fused_train = self.fuse(self._resize(a), self._resize(b)).detach()
        self.task(fused_train, target).backward()
        self.task_optimizer.step()

        test_a, test_b, test_target = meta_test
        self.generator_optimizer.zero_grad()
        with fast_weights_written_into(self.fusion, fast):
            fused_test = self.fuse(self._resize(test_a), self._resize(test_b))
            task_loss = self.task(fused_test, test_target)
            task_loss.backward()
        return float(task_loss.detach())
