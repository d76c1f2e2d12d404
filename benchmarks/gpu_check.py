"""GPU check: correctness and timings of training and inference on one CUDA device (<= 8 min).

Each part runs in its own child process under a time limit (a hang, a compiler failure or a
CUDA error in one part cannot take the others down) and prints one ``PASS``, ``FAIL`` or
``SKIP`` line with its figures:

- ``hypergradient``: ``MetaFusionTrainer.hypergradient`` in float32 on CUDA (TF32 off) against
  float64 on the CPU, same networks and batches; passes at 1e-4 relative (L2 over all of G's
  parameters);
- ``steps-fp32``, ``steps-bf16``, ``steps-compiled``, ``steps-lean``: the paper's MSRS setting
  (ReFusionNet, LossGenerator, SegFormer-b0 when ``segmentation_models_pytorch`` is installed,
  else a fixed task; 480x640 pairs in batches of 2, 256x256 fusion crop, 240x320 task input):
  meta and fusion steps of ``MetaFusionTrainer`` in float32, with ``precision="bf16"`` (also
  the cosine of its hypergradient with float32's, which must be at least 0.99), with
  ``compile=True``, and in float32 with gradient checkpointing of F and G
  (``set_grad_checkpointing()``); median times, the meta/fusion ratio and the peak CUDA memory
  of each;
- ``fuse-1280x1024``: one 1280x1024 pair through ReFusionNet (the authors' IVIF weights when
  ``../shared/data`` has them) with ``tdfusion.inference.fuse_tensors``, in float32 as loaded,
  in float32 and bf16 through ``accelerate()`` (channels-last on a GPU): times, peak memory,
  largest differences;
- ``resume``: ``fit`` for one epoch with a checkpoint, then resumed from it for a second,
  against two epochs straight (small networks, a fixed task): the parameters must agree to
  1e-4 relative (exactly on the CPU; cuDNN's backward may not be deterministic);
- ``nccl-torchrun``: a one-process ``torchrun`` launch that starts an NCCL group, all-reduces a
  CUDA tensor and takes a meta step and a fusion step inside it (with ``distributed=None``: in
  a group of one process the trainer trains on its own; the dry run launches two processes,
  so that its data-parallel path runs).

Without a CUDA device it prints one ``SKIP`` line and exits with status 0; with one, the status
is 1 when a part fails. Run from the repository root::

    python benchmarks/gpu_check.py [--budget 470] [--only PART ...] [--part-limit SECONDS]

The last line prints how many parts passed, failed and were skipped. A part that overruns its
limit fails, and the processes it started are killed with it; but when the compiled steps
have not finished their first (compiling) steps by then, the part is skipped, with how to
give it more time (``--only steps-compiled --part-limit 560 --budget 560``).

``--dry-run`` runs every part on the CPU at small sizes (the NCCL part with the gloo backend),
so that the script itself is checked where there is no GPU, before GPU time is spent on it;
its times mean nothing and it prints no CUDA memory::

    python benchmarks/gpu_check.py --dry-run --budget 900
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

#: Part name -> its time limit in seconds (the whole check stays under 8 minutes).
PARTS: dict[str, int] = {
    "hypergradient": 50,
    "steps-fp32": 60,
    "steps-bf16": 60,
    "steps-compiled": 125,
    "steps-lean": 45,
    "fuse-1280x1024": 45,
    "nccl-torchrun": 55,
    "resume": 30,
}
#: The dry run's limits: the CPU is slower, and inductor compiles for minutes there.
DRY_RUN_LIMIT: dict[str, int] = {**{name: 120 for name in PARTS}, "steps-compiled": 600}
HYPERGRADIENT_TOLERANCE = 1e-4
#: What a steps part prints once its first (warm-up, compiling) steps are done.
WARMED_UP = "WARMED-UP"
#: The least cosine of a bf16 meta step's hypergradient with float32's (the same networks,
#: batches, crop and stochastic-depth masks, the reference without TF32). In the MSRS setting on
#: the CPU it was 0.9994-0.9998 over three batches.
BF16_COSINE_MIN = 0.99


class Setting(NamedTuple):
    """Where the parts run and at what size: the GPU check, or its dry run on the CPU.

    Attributes
    ----------
    device : str
        ``"cuda"`` or ``"cpu"`` (dry run).
    image : (int, int)
        Height and width of the training pairs.
    crop : int
        Fusion crop.
    task_size : (int, int)
        Task input size (the masks' size).
    fuse_size : (int, int)
        Height and width of the pair that ``fuse-1280x1024`` fuses.
    judged : bool
        Whether the bf16 hypergradient's cosine is held to :data:`BF16_COSINE_MIN` (at the dry
        run's small sizes the hypergradient is mostly rounding, and the cosine is only shown).
    """

    device: str
    image: tuple[int, int]
    crop: int
    task_size: tuple[int, int]
    fuse_size: tuple[int, int]
    judged: bool

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak_memory(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> str:
        if not self.cuda:
            return "n/a on the CPU"
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


#: The paper's MSRS setting on the GPU.
GPU = Setting(
    "cuda", image=(480, 640), crop=256, task_size=(240, 320), fuse_size=(1024, 1280), judged=True
)
#: The same code on the CPU at small sizes, to check the script without a GPU.
DRY_RUN = Setting(
    "cpu", image=(96, 128), crop=64, task_size=(64, 96), fuse_size=(128, 160), judged=False
)


class Skip(Exception):
    """A part that cannot run here (the message says why)."""


def _task_loss(fused: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(fused, target)


def _mask_task_loss(fused: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    # A fixed task on the 9-class masks, for machines without the segmentation extra.
    return torch.nn.functional.mse_loss(fused, masks[:, None].to(fused.dtype) / 8)


def _small_networks() -> tuple[torch.nn.Module, torch.nn.Module]:
    from tdfusion.nets import LossGenerator, ReFusionNet

    torch.manual_seed(0)
    return (
        ReFusionNet(dim=8, num_blocks=1, num_heads=2),
        LossGenerator(dim=8, num_blocks=1, num_heads=2),
    )


def check_hypergradient(device: str = "cuda") -> str:
    """float32 on ``device`` vs float64 on the CPU."""
    from tdfusion import MetaFusionTrainer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(2, 1, 48, 64, generator=generator, dtype=torch.float64) for _ in range(6)]
    meta_train, meta_test = tuple(images[:3]), tuple(images[3:])
    fusion, loss_generator = _small_networks()
    results = {}
    for where, dtype in (("reference", torch.float64), ("checked", torch.float32)):
        trainer = MetaFusionTrainer(
            copy.deepcopy(fusion).to(dtype),
            _task_loss,
            copy.deepcopy(loss_generator).to(dtype),
            device="cpu" if where == "reference" else device,
            inner_lr=1e-2,
            distributed=False,
        )
        hypergradient = trainer.hypergradient(meta_train, meta_test)
        results[where] = torch.cat([g.flatten().double().cpu() for g in hypergradient.values()])
    reference, checked = results["reference"], results["checked"]
    error = float((checked - reference).norm() / reference.norm())
    verdict = "PASS" if error <= HYPERGRADIENT_TOLERANCE else "FAIL"
    return (
        f"{verdict} hypergradient: float32 {device} vs float64 CPU, relative L2 error {error:.2e} "
        f"(tolerance {HYPERGRADIENT_TOLERANCE:.0e}; |g| = {float(reference.norm()):.3e})"
    )


def _msrs_trainer(mode: str, setting: Setting = GPU) -> tuple[Any, str]:
    from tdfusion import MetaFusionTrainer
    from tdfusion.nets import LossGenerator, ReFusionNet

    torch.manual_seed(0)
    fusion, loss_generator = ReFusionNet(), LossGenerator()
    if mode == "lean":
        fusion.set_grad_checkpointing()
        loss_generator.set_grad_checkpointing()
    try:
        from tdfusion.tasks import SegmentationTask

        task: Any = SegmentationTask(9)
        task_name = "SegFormer-b0"
    except Exception:  # the seg extra is absent: a fixed task on the same masks
        task, task_name = _mask_task_loss, "a fixed task (segmentation_models_pytorch absent)"
    trainer = MetaFusionTrainer(
        fusion,
        task,
        loss_generator,
        fusion_crop=setting.crop,
        task_size=setting.task_size,
        device=setting.device,
        distributed=False,
        precision="bf16" if mode == "bf16" else "fp32",
        compile=mode == "compiled",
    )
    return trainer, task_name


def _bf16_cosine(trainer: Any, meta_train: Any, meta_test: Any, setting: Setting = GPU) -> float:
    """Cosine of the bf16 trainer's hypergradient with a float32 copy's, same batches and crop."""
    reference, _ = _msrs_trainer("fp32", setting)
    reference.fusion_model.load_state_dict(trainer.fusion_model.state_dict())
    reference.loss_generator.load_state_dict(trainer.loss_generator.state_dict())
    if isinstance(trainer.task_loss, torch.nn.Module):
        reference.task_loss.load_state_dict(trainer.task_loss.state_dict())
    state = trainer.meta_generator.get_state()  # the meta step's crop offsets are drawn from it
    flat = []
    for t in (trainer, reference):
        t.meta_generator.set_state(state)
        # The same stochastic-depth masks in T (drawn from the global generators) on both
        # sides, and a reference in true float32 (no TF32 convolutions or products), so that
        # the cosine measures bf16's rounding alone.
        torch.manual_seed(6)
        with _without_tf32(t is reference):
            gradient = t.hypergradient(meta_train, meta_test)
        flat.append(torch.cat([g.flatten().double() for g in gradient.values()]))
    return float(torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0))


@contextlib.contextmanager
def _without_tf32(active: bool = True) -> Iterator[None]:
    """cuDNN's and cuBLAS's TF32 off for the block (when ``active``), as they were after it."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if active:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _msrs_batches(
    count: int, setting: Setting = GPU
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(count):
        a, b = (torch.rand(2, 1, *setting.image, generator=generator) for _ in range(2))
        masks = torch.randint(0, 9, (2, *setting.task_size), generator=generator)
        batches.append((a, b, masks))
    return batches


def check_steps(mode: str, steps: int = 3, setting: Setting = GPU) -> str:
    """Meta and fusion steps in one mode: fp32, bf16 (``precision``), compiled or lean."""
    trainer, task_name = _msrs_trainer(mode, setting)
    batches = _msrs_batches(4, setting)
    extra = ""
    verdict = "PASS"
    if mode == "bf16":
        cosine = _bf16_cosine(trainer, *batches[:2], setting=setting)
        extra = f", hypergradient cosine with fp32 {cosine:.5f}"
        if setting.judged:
            extra += f" (at least {BF16_COSINE_MIN})"
            verdict = "PASS" if cosine >= BF16_COSINE_MIN else "FAIL"
        else:
            extra += " (not judged in the dry run)"

    def timed(step: Callable[[], Any]) -> float:
        setting.synchronize()
        start = time.perf_counter()
        step()
        setting.synchronize()
        return time.perf_counter() - start

    warm_up = timed(lambda: trainer.meta_step(batches[0], batches[1]))
    warm_up += timed(lambda: trainer.fusion_step(batches[2]))
    # Tells the parent that the first steps (the compilation, in compiled mode) are done.
    print(f"{WARMED_UP} steps-{mode} {warm_up:.1f} s", flush=True)
    setting.reset_peak_memory()
    meta = [
        timed(lambda i=i: trainer.meta_step(batches[i % 4], batches[(i + 1) % 4]))
        for i in range(steps)
    ]
    fusion = [timed(lambda i=i: trainer.fusion_step(batches[i % 4])) for i in range(steps)]
    peak = setting.peak_memory()
    meta_s, fusion_s = statistics.median(meta), statistics.median(fusion)
    if mode == "compiled":
        compiled = sorted(name for name, call in trainer._calls.items() if call.compiled)
        extra = f", compiled: {', '.join(compiled) or 'none (fell back)'}"
    task_height, task_width = setting.task_size
    return (
        f"{verdict} steps-{mode}: meta step {meta_s * 1e3:.0f} ms, "
        f"fusion step {fusion_s * 1e3:.0f} ms, meta/fusion {meta_s / fusion_s:.2f}x, "
        f"peak CUDA memory {peak} "
        f"(first meta + fusion step {warm_up:.1f} s; {task_name}, batch 2, {setting.crop} crop, "
        f"{task_height}x{task_width}){extra}"
    )


def check_fuse(setting: Setting = GPU) -> str:
    """One 1280x1024 pair in float32 and bf16."""
    from tdfusion.inference import accelerate, fuse_tensors
    from tdfusion.nets import ReFusionNet

    weights = DATA / "weights" / "ReFusion" / "ReFusion_IVIF.pth"
    if weights.is_file():
        net, source = ReFusionNet.from_pretrained(weights), "authors' IVIF weights"
    else:
        torch.manual_seed(0)
        net, source = ReFusionNet().eval(), "random weights"
    net = net.to(setting.device)
    generator = torch.Generator().manual_seed(3)
    a, b = (
        torch.rand(1, 1, *setting.fuse_size, generator=generator).to(setting.device)
        for _ in range(2)
    )
    figures = {}
    # accelerate() may change the network in place (channels-last on a GPU): it is built only
    # once float32 has been timed, so that float32 runs the network as it was loaded. bf16 is
    # compared with float32 under the same accelerate() layout, so that its difference is the
    # precision's alone.
    for name in ("fp32", "fp32-accelerated", "bf16"):
        if name == "fp32":
            model = net
        else:
            model = accelerate(net, precision="bf16" if name == "bf16" else "fp32")
        fuse_tensors(model, a, b)  # warm-up (cuDNN algorithm choice)
        setting.synchronize()
        setting.reset_peak_memory()
        start = time.perf_counter()
        fused = fuse_tensors(model, a, b)
        setting.synchronize()
        figures[name] = (time.perf_counter() - start, setting.peak_memory(), fused)
    difference = float((figures["bf16"][2] - figures["fp32-accelerated"][2]).abs().max())
    layout = float((figures["fp32-accelerated"][2] - figures["fp32"][2]).abs().max())
    height, width = setting.fuse_size
    return (
        f"PASS fuse-1280x1024: {width}x{height}, fp32 {figures['fp32'][0] * 1e3:.0f} ms "
        f"(peak {figures['fp32'][1]}), fp32 accelerate() "
        f"{figures['fp32-accelerated'][0] * 1e3:.0f} ms (peak {figures['fp32-accelerated'][1]}, "
        f"max diff {layout:.1e}), bf16 accelerate() {figures['bf16'][0] * 1e3:.0f} ms "
        f"(peak {figures['bf16'][1]}), bf16 max diff from fp32 accelerate() {difference:.1e}; "
        f"{source}"
    )


def check_resume(setting: Setting = GPU) -> str:
    """Two epochs straight against one epoch, a checkpoint, and a resumed second epoch."""
    from torch.utils.data import DataLoader, TensorDataset

    from tdfusion import MetaFusionTrainer

    generator = torch.Generator().manual_seed(4)
    a, b = (torch.rand(8, 1, 48, 64, generator=generator) for _ in range(2))

    def trainer(fresh: bool = False) -> Any:
        fusion, loss_generator = _small_networks()
        if fresh:  # other weights, so that only the checkpoint can make it agree
            with torch.no_grad():
                for parameter in [*fusion.parameters(), *loss_generator.parameters()]:
                    parameter.add_(torch.randn_like(parameter), alpha=0.1)
        return MetaFusionTrainer(
            fusion, _task_loss, loss_generator, device=setting.device, distributed=False, seed=5
        )

    def fit(model: Any, epochs: int, **options: Any) -> None:
        loader = DataLoader(TensorDataset(a, b, (a + b) / 2), batch_size=2, shuffle=True)
        model.fit(loader, epochs=epochs, meta_steps=1, progress=False, **options)

    start = time.perf_counter()
    straight = trainer()
    fit(straight, 2)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "trainer.pt"
        fit(trainer(), 1, checkpoint=path)
        resumed = trainer(fresh=True)
        fit(resumed, 2, resume=path)
    worst = 0.0
    for module in ("fusion_model", "loss_generator"):
        expected = getattr(straight, module).state_dict()
        for name, value in getattr(resumed, module).state_dict().items():
            scale = float(expected[name].abs().max()) or 1.0
            worst = max(worst, float((value - expected[name]).abs().max()) / scale)
    ok = resumed.epoch == straight.epoch == 2 and worst <= 1e-4
    return (
        f"{'PASS' if ok else 'FAIL'} resume: epochs {straight.epoch} straight and "
        f"{resumed.epoch} resumed on {setting.device}, largest parameter difference "
        f"{worst:.1e} of the parameter's scale (at most 1e-4), {time.perf_counter() - start:.1f} s"
    )


def nccl_worker(out: Path, setting: Setting = GPU) -> None:
    """Inside torchrun: an NCCL all-reduce, then a meta step and a fusion step.

    The trainer is built with ``distributed=None``: it trains data-parallel when the group has
    several processes and on its own in a group of one (``distributed=True`` requires several).
    In the dry run the process group is gloo's, on the CPU.
    """
    import torch.distributed as dist

    from tdfusion import MetaFusionTrainer

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if setting.cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    dist.init_process_group("nccl" if setting.cuda else "gloo")
    try:
        value = torch.ones(4, device=device) * (dist.get_rank() + 1)
        dist.all_reduce(value)
        fusion, loss_generator = _small_networks()
        trainer = MetaFusionTrainer(
            fusion, _task_loss, loss_generator, device=device, distributed=None
        )
        images = [torch.rand(2, 1, 64, 64) for _ in range(3)]
        meta_stats = trainer.meta_step(
            (images[0], images[1], images[0]), (images[1], images[2], images[1])
        )
        fusion_stats = trainer.fusion_step((images[2], images[0], images[2]))
        result = {
            "all_reduce": value.tolist(),
            "world_size": dist.get_world_size(),
            "backend": dist.get_backend(),
            "trainer_distributed": trainer.distributed,
            "meta_loss": float(meta_stats["task_loss"]),
            "fusion_loss": float(fusion_stats["fusion_loss"]),
        }
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def check_nccl(timeout: float, setting: Setting = GPU) -> str:
    """A one-process torchrun launch of :func:`nccl_worker`.

    The dry run launches two processes with gloo on the CPU, so that the trainer's data-parallel
    path runs too.
    """
    backend = "nccl" if setting.cuda else "gloo"
    processes = 1 if setting.cuda else 2
    if not torch.distributed.is_available():
        raise Skip("this PyTorch build has no torch.distributed")
    if setting.cuda and not torch.distributed.is_nccl_available():
        raise Skip("this PyTorch build has no NCCL")
    with tempfile.TemporaryDirectory() as scratch:
        environment = {**os.environ}
        environment["PYTHONPATH"] = os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")])
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            __file__,
            "--nccl-worker",
            scratch,
            *([] if setting.cuda else ["--dry-run"]),
        ]
        # A margin under the part's own limit, so that torchrun's end is reported here and
        # its processes are gone before the parent's limit could strike.
        try:
            completed = run_in_own_group(command, environment, max(timeout - 10, timeout * 0.8))
        except subprocess.TimeoutExpired:
            return f"FAIL nccl-torchrun: torchrun did not finish within {timeout - 10:.0f} s"
        if completed.returncode != 0:
            tail = (completed.stdout + completed.stderr).strip().splitlines()[-5:]
            return (
                f"FAIL nccl-torchrun: torchrun exited with {completed.returncode}: "
                + " | ".join(tail)
            )
        result = json.loads((Path(scratch) / "rank0.json").read_text())
    expected = [processes * (processes + 1) / 2] * 4  # the ranks' (rank + 1), summed
    ok = (
        result["all_reduce"] == expected
        and result["backend"] == backend
        and result["world_size"] == processes
        and result["trainer_distributed"] == (processes > 1)
    )
    return (
        f"{'PASS' if ok else 'FAIL'} nccl-torchrun: backend {result['backend']}, world size "
        f"{result['world_size']}, all-reduce {result['all_reduce']}, distributed trainer "
        f"{result['trainer_distributed']}, meta task loss {result['meta_loss']:.4f}, "
        f"fusion loss {result['fusion_loss']:.4f}"
    )


def run_part(name: str, timeout: float, setting: Setting = GPU) -> str:
    """One part in this process; returns its result line."""
    if setting.cuda and not torch.cuda.is_available():
        return f"SKIP {name}: no CUDA device"
    try:
        if name == "hypergradient":
            return check_hypergradient(setting.device)
        if name.startswith("steps-"):
            try:
                return check_steps(name.removeprefix("steps-"), setting=setting)
            except Exception as error:
                if type(error).__module__.startswith("torch._dynamo") and "compiled" in name:
                    raise Skip(
                        f"torch.compile cannot compile these networks here: {error}"
                    ) from error
                raise
        if name == "fuse-1280x1024":
            return check_fuse(setting)
        if name == "nccl-torchrun":
            return check_nccl(timeout, setting)
        if name == "resume":
            return check_resume(setting)
        raise Skip(f"unknown part (the parts are {', '.join(PARTS)})")
    except Skip as reason:
        return f"SKIP {name}: {reason}"
    except Exception as error:  # any failure is reported as this part's FAIL line
        return f"FAIL {name}: {type(error).__name__}: {str(error).strip()[:300]}"


def run_in_own_group(
    command: list[str], environment: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a process group of its own; on ``timeout`` kill the whole group.

    ``subprocess.run(timeout=...)`` kills only its direct child: the processes that a child
    started (torchrun's workers) would live on and hold the GPU through the next parts.

    Raises
    ------
    subprocess.TimeoutExpired
        After the group was killed; its ``output`` is what the command printed until then.
    """
    process = subprocess.Popen(
        command,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def run_part_in_child(name: str, timeout: float, setting: Setting = GPU) -> str:
    """One part in a fresh process under ``timeout`` seconds; its result line."""
    environment = {**os.environ}
    environment["PYTHONPATH"] = os.pathsep.join([str(REPO), environment.get("PYTHONPATH", "")])
    command = [sys.executable, __file__, "--part", name, "--timeout", str(int(timeout))]
    if not setting.cuda:
        command.append("--dry-run")
    try:
        completed = run_in_own_group(command, environment, timeout)
    except subprocess.TimeoutExpired as expired:
        if name == "steps-compiled" and WARMED_UP not in (expired.output or ""):
            # Inductor's first compilation of F, G and T (forward and backward) with a cold
            # cache can take longer than the part's limit: that is not a failure of the code.
            return (
                f"SKIP {name}: the first (compiling) steps did not finish within {timeout:.0f} s "
                "(a cold compile cache; run the part alone with more time: --only "
                "steps-compiled --part-limit 560 --budget 560)"
            )
        return f"FAIL {name}: did not finish within {timeout:.0f} s"
    lines = [
        line for line in completed.stdout.splitlines() if line.startswith(("PASS", "FAIL", "SKIP"))
    ]
    if completed.returncode != 0 or not lines:
        tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
        return f"FAIL {name}: the child exited with {completed.returncode}: {tail}"
    return lines[-1]


def run_parts(
    names: list[str],
    budget: float,
    runner: Callable[[str, float], str],
    limits: dict[str, int] | None = None,
) -> list[str]:
    """Run the parts ``names`` with ``runner(name, timeout)`` within ``budget`` seconds.

    Each part gets its own limit (``limits``, by default :data:`PARTS`) or what is left of the
    budget, whichever is less; the parts that find less than 10 s left are skipped. Every result
    line is printed as it comes.
    """
    limits = PARTS if limits is None else limits
    deadline = time.monotonic() + budget
    lines = []
    for name in names:
        remaining = deadline - time.monotonic()
        if remaining < 10:
            line = f"SKIP {name}: the time budget of {budget:.0f} s is spent"
        else:
            line = runner(name, min(limits[name], remaining))
        lines.append(line)
        print(line, flush=True)
    return lines


def summary(lines: list[str]) -> tuple[str, int]:
    """The closing line and exit status for the part lines ``lines``."""
    counts = {
        verdict: sum(line.startswith(verdict) for line in lines)
        for verdict in ("PASS", "FAIL", "SKIP")
    }
    closing = (
        f"gpu check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"
    )
    return closing, 1 if counts["FAIL"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=470, help="seconds for all parts")
    parser.add_argument("--only", nargs="+", choices=list(PARTS), help="run only these parts")
    parser.add_argument(
        "--part-limit",
        type=float,
        help="seconds each part may take, instead of its own limit (e.g. the compiled steps "
        "with a cold compile cache); the budget still applies",
    )
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=60, help=argparse.SUPPRESS)
    parser.add_argument("--nccl-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run every part on the CPU at small sizes (gloo for the NCCL part), to check this "
        "script without a GPU; its times mean nothing",
    )
    args = parser.parse_args(argv)
    setting = DRY_RUN if args.dry_run else GPU
    if args.nccl_worker is not None:
        nccl_worker(args.nccl_worker, setting)
        return 0
    if args.part is not None:
        print(run_part(args.part, args.timeout, setting), flush=True)
        return 0
    limits = DRY_RUN_LIMIT if args.dry_run else PARTS
    if args.part_limit is not None:
        limits = {name: int(args.part_limit) for name in PARTS}
    if args.dry_run:
        print(f"dry run on the CPU (torch {torch.__version__}): times mean nothing", flush=True)
        runner = functools.partial(run_part_in_child, setting=DRY_RUN)
        lines = run_parts(args.only or list(PARTS), args.budget, runner, limits)
        closing, status = summary(lines)
        print(closing)
        return status
    if not torch.cuda.is_available():
        print(
            "SKIP gpu check: no CUDA device here (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}); run it on a machine with a GPU. Nothing was checked."
        )
        return 0
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"{torch.cuda.get_device_name(0)} ({memory:.0f} GiB)",
        flush=True,
    )
    lines = run_parts(args.only or list(PARTS), args.budget, run_part_in_child, limits)
    closing, status = summary(lines)
    print(closing)
    return status


if __name__ == "__main__":
    sys.exit(main())
