"""The research preset and the task network's inner step (``task_inner_optimizer``).

The reference below re-implements the mechanics of the authors' research code from scratch:
``.backward(create_graph=True)`` into the parameters' ``.grad``, fast weights ``p - lr * p.grad``
written into the fusion network for the outer forward, ``T`` adapted by ``step()`` of its own
Adam optimiser, the squared-weight intensity loss and the cross-entropy at the label
resolution. No ``torch.func`` and nothing of the trainer is used.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import nn

from tdfusion import MetaFusionTrainer
from tdfusion.trainer.meta import TaskOptimizerStep

TASK_SIZE = (6, 8)  # the task input; the labels stay at the full 12 x 16


class TinyFusion(nn.Module):
    in_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv2(torch.tanh(self.conv1(torch.cat([a, b], 1)))))


class TinyGenerator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(torch.cat([a, b], 1)))).softmax(dim=1)


class LabelResolutionSegmentation(nn.Module):
    """The research code's loss on a tiny network: logits upsampled to the label map with
    ``align_corners=True``, then cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, fused: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.conv(fused)))
        logits = F.interpolate(logits, masks.shape[-2:], mode="bilinear", align_corners=True)
        return F.cross_entropy(logits, masks)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 1, 12, 16, generator=generator, dtype=torch.float64)
    b = torch.rand(2, 1, 12, 16, generator=generator, dtype=torch.float64)
    return a, b, torch.randint(0, 3, (2, 12, 16), generator=generator)


# ---------------------------------------------------------------- the research code, rebuilt
def research_fusion_loss(fused, a, b, weights):
    """``mse(w_a (a - f), 0) + mse(w_b (b - f), 0)`` plus the Sobel L1 term."""
    intensity = (weights[:, :1] * (a - fused)).square().mean()
    intensity = intensity + (weights[:, 1:] * (b - fused)).square().mean()
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]).double()
    gradient = 0
    for kernel in (sobel_x, sobel_x.t()):
        kernel = kernel[None, None]
        grad_a, grad_b, grad_f = (F.conv2d(x, kernel, padding=1) for x in (a, b, fused))
        target = torch.where(grad_a.abs() >= grad_b.abs(), grad_a, grad_b)
        gradient = gradient + (grad_f - target).abs().mean()
    return intensity + gradient


@contextlib.contextmanager
def fast_weights(module: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """The module's parameters replaced by non-leaf tensors, as the research code's F'."""
    originals = {}
    for name, value in values.items():
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        originals[name] = (owner, attribute, owner._parameters.pop(attribute))
        setattr(owner, attribute, value)
    try:
        yield
    finally:
        for owner, attribute, parameter in originals.values():
            delattr(owner, attribute)
            owner._parameters[attribute] = parameter


def resize(image: torch.Tensor) -> torch.Tensor:
    return F.interpolate(image, size=TASK_SIZE, mode="bilinear", align_corners=False)


def research_meta_gradient(fusion, generator, task, task_optimizer, meta_train, meta_test, lr):
    """G's gradient as the research code computes it; T's optimiser takes its step."""
    a, b, masks = meta_train
    for module in (fusion, generator, task):
        module.zero_grad(set_to_none=True)
    fusion_loss = research_fusion_loss(fusion(a, b), a, b, generator(a, b))
    with warnings.catch_warnings():  # the research code's reference cycle, broken below
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph")
        fusion_loss.backward(create_graph=True)
    fast = {name: p - lr * p.grad for name, p in fusion.named_parameters()}
    saved_task = copy.deepcopy(task.state_dict())
    fused_train = fusion(resize(a), resize(b)).detach()
    task(fused_train, masks).backward()
    task_optimizer.step()  # T' = one step of T's own Adam, its moments kept
    for p in generator.parameters():
        p.grad = None
    test_a, test_b, test_masks = meta_test
    with fast_weights(fusion, fast):
        task(fusion(resize(test_a), resize(test_b)), test_masks).backward()
    task.load_state_dict(saved_task)  # only T's weights are reloaded
    gradient = {name: p.grad.detach().clone() for name, p in generator.named_parameters()}
    for module in (fusion, generator, task):  # break the .grad reference cycles
        module.zero_grad(set_to_none=True)
    return gradient


def research_fusion_step(fusion, generator, task, fusion_optimizer, task_optimizer, data):
    """The research fusion step: F learns first, then T on F's output after that update."""
    a, b, masks = data
    with torch.no_grad():
        weights = generator(a, b)
    fusion_optimizer.zero_grad()
    research_fusion_loss(fusion(a, b), a, b, weights).backward()
    fusion_optimizer.step()
    task_optimizer.zero_grad()
    with torch.no_grad():
        fused = fusion(resize(a), resize(b))
    task(fused, masks).backward()
    task_optimizer.step()


def models():
    torch.manual_seed(0)
    return TinyFusion().double(), TinyGenerator().double(), LabelResolutionSegmentation().double()


def relative_error(ours: dict, reference: dict) -> float:
    difference = sum(float((ours[k] - reference[k]).square().sum()) for k in reference)
    return (difference / sum(float(v.square().sum()) for v in reference.values())) ** 0.5


@pytest.mark.parametrize("method", ["forward", "backprop"])
def test_research_preset_reproduces_the_research_code_in_float64(method):
    fusion, generator, task = models()
    lr = 0.3  # a large step, so that F', T' and the carried Adam moments all matter
    trainer = MetaFusionTrainer.from_preset(
        "research",
        fusion,
        task,
        generator,
        inner_lr=lr,
        fusion_lr=lr,
        task_lr=0.05,
        task_size=TASK_SIZE,
        hypergradient_method=method,
        device="cpu",
    )
    reference = [copy.deepcopy(m) for m in (fusion, generator, task)]
    ref_fusion, ref_generator, ref_task = reference
    ref_fusion_optimizer = torch.optim.Adam(ref_fusion.parameters(), lr=lr)
    ref_task_optimizer = torch.optim.Adam(ref_task.parameters(), lr=0.05)

    # Two fusion steps first: F moves, and T's Adam has moments that the meta step carries.
    for seed in (3, 4):
        trainer.fusion_step(batch(seed))
        research_fusion_step(*reference, ref_fusion_optimizer, ref_task_optimizer, batch(seed))
    for ours, theirs in zip((fusion, task), (ref_fusion, ref_task)):
        for p, q in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)

    meta_train, meta_test = batch(1), batch(2)
    ours = trainer.hypergradient(meta_train, meta_test)
    theirs = research_meta_gradient(*reference, ref_task_optimizer, meta_train, meta_test, lr=lr)
    assert max(float(g.abs().max()) for g in theirs.values()) > 1e-9  # not vacuous
    assert relative_error(ours, theirs) < 1e-10

    # The meta step takes the normalised G update and keeps T's Adam step, as the research
    # code's optimizer2 does; T's weights are as before.
    task_before = copy.deepcopy(task.state_dict())
    trainer.meta_step(meta_train, meta_test)
    largest = max(float(g.abs().max()) for g in theirs.values())
    for name, p in ref_generator.named_parameters():
        expected = p - trainer.generator_lr * theirs[name] / largest
        torch.testing.assert_close(
            dict(generator.named_parameters())[name], expected, rtol=1e-10, atol=1e-14
        )
    for name, value in task.state_dict().items():
        assert torch.equal(value, task_before[name])
    ours_state, theirs_state = trainer.task_optimizer.state, ref_task_optimizer.state
    for p, q in zip(task.parameters(), ref_task.parameters()):
        assert int(ours_state[p]["step"]) == int(theirs_state[q]["step"]) == 3
        torch.testing.assert_close(ours_state[p]["exp_avg"], theirs_state[q]["exp_avg"])
        torch.testing.assert_close(ours_state[p]["exp_avg_sq"], theirs_state[q]["exp_avg_sq"])


def test_the_default_differs_from_the_research_code():
    """The float64 test above can fail: the default's gradient is another one."""
    fusion, generator, task = models()
    trainer = MetaFusionTrainer(
        fusion, task, generator, inner_lr=0.3, task_lr=0.05, task_size=TASK_SIZE, device="cpu"
    )
    reference = [copy.deepcopy(m) for m in (fusion, generator, task)]
    ref_task_optimizer = torch.optim.Adam(reference[2].parameters(), lr=0.05)
    meta_train, meta_test = batch(1), batch(2)
    ours = trainer.hypergradient(meta_train, meta_test)
    theirs = research_meta_gradient(*reference, ref_task_optimizer, meta_train, meta_test, 0.3)
    assert relative_error(ours, theirs) > 1e-3


# ---------------------------------------------------------------- the options of T's step
def make_trainer(**keywords) -> MetaFusionTrainer:
    fusion, generator, task = models()
    settings = dict(inner_lr=0.3, task_lr=0.05, task_size=TASK_SIZE, device="cpu")
    return MetaFusionTrainer(fusion, task, generator, **{**settings, **keywords})


def test_sgd_task_step_is_the_default():
    meta_train, meta_test = batch(1), batch(2)
    default = make_trainer().hypergradient(meta_train, meta_test)
    sgd = make_trainer(task_inner_optimizer="sgd").hypergradient(meta_train, meta_test)
    adam = make_trainer(task_inner_optimizer="adam").hypergradient(meta_train, meta_test)
    for name in default:
        assert torch.equal(default[name], sgd[name])
    assert relative_error(adam, default) > 1e-3  # the option does change T'


@pytest.mark.parametrize(
    ("name", "transformation"),
    [("sgd", torchopt.sgd(0.05)), ("adam", torchopt.adam(0.05, eps_root=1e-8))],
)
def test_a_torchopt_transformation_equals_its_name(name, transformation):
    meta_train, meta_test = batch(1), batch(2)
    named = make_trainer(task_inner_optimizer=name).hypergradient(meta_train, meta_test)
    given = make_trainer(task_inner_optimizer=transformation)
    result = given.hypergradient(meta_train, meta_test)
    for key in named:
        torch.testing.assert_close(result[key], named[key], rtol=1e-12, atol=0)
    assert "task_inner_optimizer" not in given.config()  # a transformation is not saved


def adam_state(optimizer: torch.optim.Optimizer) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    return [
        (int(s["step"]), s["exp_avg"].clone(), s["exp_avg_sq"].clone())
        for s in optimizer.state.values()
    ]


@pytest.mark.parametrize("persistent", [False, True])
def test_the_task_optimizer_step_keeps_its_state_only_when_asked(persistent):
    option = "task_optimizer_persistent" if persistent else "task_optimizer"
    trainer = make_trainer(task_inner_optimizer=option)
    assert isinstance(trainer.task_inner_step, TaskOptimizerStep)
    trainer.fusion_step(batch(3))  # T's Adam has moments now
    before = adam_state(trainer.task_optimizer)
    weights = copy.deepcopy(trainer.task_loss.state_dict())
    grads = [p.grad for p in trainer.task_loss.parameters()]

    trainer.hypergradient(batch(1), batch(2))  # a query never changes the state
    assert all(
        s == t and torch.equal(m, n) and torch.equal(v, w)
        for (s, m, v), (t, n, w) in zip(adam_state(trainer.task_optimizer), before)
    )
    trainer.meta_step(batch(1), batch(2))
    after = adam_state(trainer.task_optimizer)
    assert [s for s, _, _ in after] == [2 if persistent else 1] * len(before)
    assert all(torch.equal(m, n) != persistent for (_, m, _), (_, n, _) in zip(after, before))
    for name, value in trainer.task_loss.state_dict().items():
        assert torch.equal(value, weights[name])
    assert all(p.grad is g for p, g in zip(trainer.task_loss.parameters(), grads))


def test_the_task_optimizer_step_is_one_step_of_that_optimizer():
    """T' equals what the task optimiser's own step() gives (here Adam with moments)."""
    trainer = make_trainer(task_inner_optimizer="task_optimizer")
    trainer.fusion_step(batch(3))
    task = trainer.task_loss
    params = list(task.parameters())
    grads = [torch.rand_like(p) for p in params]
    adapted = trainer.task_inner_step(params, grads, 0.5)  # lr_scale: the schedule is its own
    copy_task = copy.deepcopy(task)
    copy_optimizer = torch.optim.Adam(copy_task.parameters(), lr=0.05)
    copy_optimizer.load_state_dict(trainer.task_optimizer.state_dict())
    for p, g in zip(copy_task.parameters(), grads):
        p.grad = g
    copy_optimizer.step()
    for ours, theirs in zip(adapted, copy_task.parameters()):
        assert torch.equal(ours, theirs.detach())


def test_unknown_task_inner_optimizer_is_refused():
    with pytest.raises(ValueError, match="task_inner_optimizer"):
        make_trainer(task_inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match="fusion_step_order"):
        make_trainer(fusion_step_order="later")
    with pytest.raises(ValueError, match="preset"):
        MetaFusionTrainer.from_preset("paper", TinyFusion(), F.mse_loss)


@pytest.mark.parametrize("order", ["simultaneous", "sequential"])
def test_the_fusion_step_order(order):
    """T learns from F before or after this step's update of F."""
    trainer = make_trainer(fusion_step_order=order)
    fusion_before = copy.deepcopy(trainer.fusion_model)
    task = copy.deepcopy(trainer.task_loss)
    a, b, masks = batch(3)
    trainer.fusion_step((a, b, masks))
    source = trainer.fusion_model if order == "sequential" else fusion_before
    with torch.no_grad():
        fused = source(resize(a), resize(b))
    optimizer = torch.optim.Adam(task.parameters(), lr=0.05)
    task(fused, masks).backward()
    optimizer.step()
    for ours, expected in zip(trainer.task_loss.parameters(), task.parameters()):
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-15)


def test_a_checkpoint_keeps_the_task_step_and_its_optimizer(tmp_path):
    trainer = make_trainer(task_inner_optimizer="task_optimizer_persistent")
    trainer.fusion_step(batch(3))
    trainer.meta_step(batch(1), batch(2))
    trainer.save(tmp_path / "last.pt")
    fusion, generator, task = models()
    loaded = MetaFusionTrainer.load(tmp_path / "last.pt", fusion, task, generator)
    step = loaded.task_inner_step
    assert isinstance(step, TaskOptimizerStep) and step.persistent
    assert step.optimizer is loaded.task_optimizer
    for (s, m, v), (t, n, w) in zip(
        adam_state(loaded.task_optimizer), adam_state(trainer.task_optimizer)
    ):
        assert s == t == 2 and torch.equal(m, n) and torch.equal(v, w)
