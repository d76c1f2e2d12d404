"""Tests of the task adapters (SegFormer, YOLOv8) and the downstream scores."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.func import functional_call

from tdfusion.errors import DataError, OptionalDependencyError
from tdfusion.tasks import (
    Detections,
    DetectionScore,
    DetectionTask,
    SegmentationScore,
    SegmentationTask,
    TaskAdapter,
)
from tdfusion.tasks._ultralytics import load_ultralytics
from tdfusion.tasks.base import evaluation_mode, pad_to_multiple

REPO_ROOT = Path(__file__).resolve().parents[1]

# The paper's task input sizes: MSRS segmentation 240x320 (9 classes), M3FD detection 192x256
# (6 classes).
MSRS_SIZE = (240, 320)
M3FD_SIZE = (192, 256)


@pytest.fixture(scope="module")
def segmentation_task() -> SegmentationTask:
    torch.manual_seed(0)
    return SegmentationTask(num_classes=9)


@pytest.fixture(scope="module")
def detection_task() -> DetectionTask:
    torch.manual_seed(0)
    return DetectionTask(num_classes=6)


def m3fd_targets() -> torch.Tensor:
    # Deliberately not sorted by image index: the adapter must sort them for ultralytics.
    return torch.tensor(
        [
            [1, 2, 0.30, 0.35, 0.20, 0.25],
            [0, 1, 0.50, 0.50, 0.30, 0.40],
            [1, 0, 0.70, 0.60, 0.15, 0.30],
            [0, 5, 0.20, 0.70, 0.25, 0.20],
        ]
    )


def gradient_wrt_fused(task: nn.Module, fused: torch.Tensor, target: object) -> torch.Tensor:
    fused = fused.clone().requires_grad_(True)
    loss = task(fused, target)
    assert loss.ndim == 0
    assert torch.isfinite(loss)
    (gradient,) = torch.autograd.grad(loss, fused)
    return gradient


def assert_useful_gradient(gradient: torch.Tensor) -> None:
    assert torch.isfinite(gradient).all()
    assert gradient.abs().sum() > 0


# --- shared helpers -------------------------------------------------------------------------


def test_pad_to_multiple_pads_bottom_right_only() -> None:
    image = torch.arange(6.0).reshape(1, 1, 2, 3)
    padded = pad_to_multiple(image, 4, mode="replicate")
    assert padded.shape == (1, 1, 4, 4)
    assert torch.equal(padded[..., :2, :3], image)
    assert torch.equal(padded[..., 3, :3], image[..., 1, :])  # bottom rows repeat the last row
    assert pad_to_multiple(image, 1) is image


def test_evaluation_mode_restores_mixed_modes() -> None:
    net = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout())
    net[1].eval()
    with evaluation_mode(net):
        assert not any(m.training for m in net.modules())
    assert net.training and net[0].training and not net[1].training


# --- segmentation ---------------------------------------------------------------------------


def test_segmentation_task_is_a_task_adapter(segmentation_task: SegmentationTask) -> None:
    assert isinstance(segmentation_task, TaskAdapter)
    assert isinstance(segmentation_task, nn.Module)


@pytest.mark.parametrize(
    ("image_size", "mask_size"),
    [(MSRS_SIZE, MSRS_SIZE), ((37, 53), (37, 53)), ((120, 160), MSRS_SIZE)],
    ids=["msrs-240x320", "odd-37x53", "logits-upsampled-to-mask"],
)
def test_segmentation_loss_has_gradient_wrt_fused(
    segmentation_task: SegmentationTask, image_size: tuple[int, int], mask_size: tuple[int, int]
) -> None:
    fused = torch.rand(2, 1, *image_size)
    masks = torch.randint(0, 9, (2, *mask_size))
    assert_useful_gradient(gradient_wrt_fused(segmentation_task, fused, masks))


def test_segmentation_loss_is_cross_entropy_of_the_logits(
    segmentation_task: SegmentationTask,
) -> None:
    fused = torch.rand(1, 1, 40, 40)
    masks = torch.randint(0, 9, (1, 40, 40))
    with evaluation_mode(segmentation_task), torch.no_grad():
        loss = segmentation_task(fused, masks)
        logits = segmentation_task.logits(fused)
    assert logits.shape == (1, 9, 40, 40)
    expected = torch.nn.functional.cross_entropy(logits, masks)
    torch.testing.assert_close(loss, expected)


def test_segmentation_ignore_index_leaves_pixels_out() -> None:
    torch.manual_seed(0)
    task = SegmentationTask(num_classes=3, ignore_index=255).eval()
    fused = torch.rand(1, 1, 32, 32)
    masks = torch.randint(0, 3, (1, 32, 32))
    void = masks.clone()
    void[:, :16] = 255
    with torch.no_grad():
        logits = task.logits(fused)
        expected = torch.nn.functional.cross_entropy(logits[:, :, 16:], masks[:, 16:])
        torch.testing.assert_close(task(fused, void), expected)


def test_segmentation_rejects_bad_targets(segmentation_task: SegmentationTask) -> None:
    fused = torch.rand(1, 1, 32, 32)
    masks = torch.zeros(1, 32, 32, dtype=torch.long)
    masks[0, 0, 0] = 255
    with pytest.raises(DataError, match=r"\[255\].*ignore_index"):
        segmentation_task(fused, masks)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        segmentation_task(torch.rand(1, 3, 32, 32), masks)
    with pytest.raises(ValueError, match="fused holds 2"):
        segmentation_task(torch.rand(2, 1, 32, 32), masks)
    with pytest.raises(ValueError, match="integer"):
        segmentation_task(fused, masks.float())


def test_segmentation_predict_gives_label_maps(segmentation_task: SegmentationTask) -> None:
    segmentation_task.train()
    labels = segmentation_task.predict(torch.rand(2, 1, 37, 53))
    assert labels.shape == (2, 37, 53)
    assert labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < 9
    assert segmentation_task.training  # the mode is restored


# --- detection ------------------------------------------------------------------------------


def test_detection_task_is_a_task_adapter(detection_task: DetectionTask) -> None:
    assert isinstance(detection_task, TaskAdapter)
    assert sum(p.numel() for p in detection_task.parameters()) > 1_000_000  # YOLOv8-n, ~3M


@pytest.mark.parametrize(
    ("image_size", "targets"),
    [
        (M3FD_SIZE, m3fd_targets()),
        ((100, 150), m3fd_targets()),
        (M3FD_SIZE, torch.zeros(0, 6)),
    ],
    ids=["m3fd-192x256", "odd-100x150", "no-objects"],
)
def test_detection_loss_has_gradient_wrt_fused(
    detection_task: DetectionTask, image_size: tuple[int, int], targets: torch.Tensor
) -> None:
    detection_task.train()
    fused = torch.rand(2, 1, *image_size)
    assert_useful_gradient(gradient_wrt_fused(detection_task, fused, targets))


def msrs_detection_batch(shared_data: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Infrared images of the real MSRS samples at M3FD's task size, with their YOLO boxes."""
    import numpy as np
    from PIL import Image

    example = shared_data / "MSRS" / "example"
    images, rows = [], []
    for index, name in enumerate(names):
        with Image.open(example / "ir" / f"{name}.png") as image:
            gray = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))
            images.append(gray[None] / 255)
        for line in (example / "label" / "infrared" / f"{name}.txt").read_text().splitlines():
            if line.strip():
                rows.append([index, *map(float, line.split())])
    fused = torch.nn.functional.interpolate(
        torch.stack(images), size=M3FD_SIZE, mode="bilinear", align_corners=False
    )
    return fused, torch.tensor(rows)


def test_detection_on_real_msrs_samples(shared_data: Path) -> None:
    torch.manual_seed(0)
    task = DetectionTask(num_classes=3)  # person, bicycle, car
    fused, targets = msrs_detection_batch(shared_data, ["00004N", "00055D"])
    assert targets.shape[0] > 2
    assert_useful_gradient(gradient_wrt_fused(task, fused, targets))

    # The ground truth, given back as detections, scores the ceiling on every class present.
    height, width = M3FD_SIZE
    found = []
    for index in range(2):
        rows = targets[targets[:, 0] == index]
        centre = rows[:, 2:4] * torch.tensor([width, height])
        half = rows[:, 4:6] * torch.tensor([width, height]) / 2
        boxes = torch.cat((centre - half, centre + half), dim=1)
        found.append(Detections(boxes, torch.linspace(0.9, 0.5, len(rows)), rows[:, 1].long()))
    score = DetectionScore()
    score.update(found, targets, image_size=M3FD_SIZE)
    result = score.compute()
    assert set(result["per_class"]) == set(targets[:, 1].long().tolist())
    assert result["mAP50-95"] == pytest.approx(0.995)


def test_detection_loss_is_per_image(detection_task: DetectionTask) -> None:
    # Two copies of one image (same batch statistics) must give the single image's loss:
    # ultralytics multiplies its loss by the batch size, the adapter divides it out.
    detection_task.train()
    image = torch.rand(1, 1, 128, 128)
    boxes = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [0, 3, 0.2, 0.3, 0.2, 0.2]])
    twice = torch.cat((boxes, boxes + torch.tensor([1.0, 0, 0, 0, 0, 0])))
    components = detection_task.loss_components(image, boxes)
    assert components.shape == (3,)
    assert (components > 0).all()
    torch.testing.assert_close(
        detection_task.loss_components(image.repeat(2, 1, 1, 1), twice), components
    )


def test_detection_targets_scale_with_the_padding(detection_task: DetectionTask) -> None:
    # A 100x150 image padded to 128x160 must see its boxes where they are, which the padded
    # 128x160 image with rescaled targets also describes.
    detection_task.train()
    image = torch.rand(1, 1, 100, 150)
    padded = torch.nn.functional.pad(image, (0, 10, 0, 28), value=114 / 255)
    boxes = torch.tensor([[0, 2, 0.4, 0.5, 0.3, 0.4]])
    in_padded_frame = boxes * torch.tensor([1, 1, 150 / 160, 100 / 128, 150 / 160, 100 / 128])
    torch.testing.assert_close(
        detection_task(image, boxes), detection_task(padded, in_padded_frame)
    )


def test_detection_loss_in_eval_mode_matches_raw_outputs(detection_task: DetectionTask) -> None:
    fused = torch.rand(1, 1, 64, 96, requires_grad=True)
    with evaluation_mode(detection_task):
        loss = detection_task(fused, m3fd_targets()[1:2])
    assert torch.isfinite(loss)
    (gradient,) = torch.autograd.grad(loss, fused)
    assert_useful_gradient(gradient)


def test_detection_float64(detection_task: DetectionTask) -> None:
    task = copy.deepcopy(detection_task).double()
    fused = torch.rand(1, 1, 64, 64, dtype=torch.float64)
    loss = task(fused, m3fd_targets()[1:2])
    assert loss.dtype == torch.float64
    assert torch.isfinite(loss)
    assert torch.get_default_dtype() == torch.float32  # restored


def test_detection_state_dict_round_trip(detection_task: DetectionTask) -> None:
    detection_task.eval()
    restored = DetectionTask(num_classes=6).eval()
    restored.load_state_dict(detection_task.state_dict())
    fused = torch.rand(1, 1, 64, 64)
    targets = m3fd_targets()[1:2]
    with torch.no_grad():
        torch.testing.assert_close(restored(fused, targets), detection_task(fused, targets))


def test_detection_rejects_bad_targets(detection_task: DetectionTask) -> None:
    fused = torch.rand(2, 1, 64, 64)
    with pytest.raises(DataError, match="row 0"):
        detection_task(fused, torch.tensor([[0, 6, 0.5, 0.5, 0.1, 0.1]]))
    with pytest.raises(DataError, match="row 1"):
        detection_task(
            fused, torch.tensor([[0, 1, 0.5, 0.5, 0.1, 0.1], [2, 1, 0.5, 0.5, 0.1, 0.1]])
        )
    with pytest.raises(ValueError, match=r"\(M, 6\)"):
        detection_task(fused, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="floating-point"):
        detection_task(fused.long(), torch.zeros(0, 6))


@pytest.mark.parametrize("model", ["yolov8n.pt", "https://example.com/yolov8n.yaml"])
def test_detection_refuses_weights_and_urls(model: str) -> None:
    with pytest.raises(ValueError, match="never downloaded"):
        DetectionTask(num_classes=2, model=model)


def small_model_yaml(**changes: str) -> str:
    """A two-scale YOLOv8-like yaml with some of its fields replaced by ``changes``."""
    fields = {
        "activation": "nn.SiLU()",
        "first_module": "Conv",
        "first_args": "[16, 3, 2]",
    }
    fields.update(changes)
    return textwrap.dedent(
        f"""
        nc: 2
        activation: {fields["activation"]}
        backbone:
          - [-1, 1, {fields["first_module"]}, {fields["first_args"]}]
          - [-1, 1, Conv, [32, 3, 2]]
          - [-1, 1, Conv, [64, 3, 2]]
          - [-1, 1, Conv, [64, 3, 2]]
        head:
          - [-1, 1, nn.Upsample, [None, 2, "nearest"]]
          - [[-1, 2], 1, Concat, [1]]
          - [-1, 1, C2f, [32]]
          - [[6, 3], 1, Detect, [nc]]
        """
    )


def test_a_local_model_yaml_builds_with_its_activation(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text(small_model_yaml(activation="nn.LeakyReLU(0.1)"))
    task = DetectionTask(num_classes=2, model=path)
    activations = {type(m) for m in task.modules() if isinstance(m, (nn.LeakyReLU, nn.SiLU))}
    assert activations == {nn.LeakyReLU}
    assert task(torch.rand(1, 1, 64, 64), torch.zeros(0, 6)).isfinite()
    ultralytics = load_ultralytics()
    assert type(ultralytics.Conv.default_act) is nn.SiLU  # restored after the build


CODE = "__import__('pathlib').Path({marker!r}).write_text('ran')"


@pytest.mark.parametrize(
    "field, template",
    [
        ("activation", CODE),
        ("activation", f"nn.SiLU() if {CODE} else nn.ReLU()"),
        ("activation", f"nn.LeakyReLU({CODE})"),
        ("activation", "nn.Module()"),
        ("first_module", "exec"),
        ("first_module", "torch_safe_load"),
        ("first_module", "nn.init.uniform_"),
        ("first_module", "DetectionModel"),
    ],
)
def test_a_model_yaml_runs_no_code(tmp_path: Path, field: str, template: str) -> None:
    marker = tmp_path / "ran.txt"
    text = template.format(marker=str(marker))
    path = tmp_path / "evil.yaml"
    path.write_text(small_model_yaml(**{field: f'"{text}"'}))
    with pytest.raises(DataError, match=r"model yaml .*evil\.yaml.* is not allowed") as caught:
        DetectionTask(num_classes=2, model=path)
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def test_a_recipe_json_model_runs_no_code(tmp_path: Path) -> None:
    from tdfusion.recipes import build_task, load_recipe

    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.yaml"
    path.write_text(small_model_yaml(activation=f'"{CODE.format(marker=str(marker))}"'))
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"name": "m3fd-detection", "num_classes": 2, "model": str(path)}))
    recipe = load_recipe(None, config)
    with pytest.raises(DataError, match="activation .* is not allowed"):
        build_task(recipe)
    assert not marker.exists()


def test_model_yaml_arguments_must_be_plain_values(tmp_path: Path) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(small_model_yaml(first_args="[16, 3, {call: me}]"))
    with pytest.raises(DataError, match="layer 0: the arguments must be a list of plain values"):
        DetectionTask(num_classes=2, model=path)
    path.write_text("backbone: [\n")
    with pytest.raises(DataError, match="cannot read model yaml .*odd.yaml"):
        DetectionTask(num_classes=2, model=path)
    with pytest.raises(DataError, match="missing.yaml does not exist"):
        DetectionTask(num_classes=2, model=tmp_path / "missing.yaml")


def test_detection_predict_gives_boxes_scores_classes(detection_task: DetectionTask) -> None:
    detection_task.train()
    height, width = 100, 150
    detections = detection_task.predict(torch.rand(2, 1, height, width), conf=0.001)
    assert detection_task.training  # the mode is restored
    assert len(detections) == 2
    assert any(len(found.scores) for found in detections)
    for found in detections:
        assert isinstance(found, Detections)
        count = found.scores.shape[0]
        assert found.boxes.shape == (count, 4)
        assert found.classes.shape == (count,) and found.classes.dtype == torch.int64
        assert ((found.classes >= 0) & (found.classes < 6)).all()
        assert (found.scores >= 0.001).all()
        assert (found.scores[:-1] >= found.scores[1:]).all()
        assert (found.boxes[:, 0::2] <= width).all() and (found.boxes[:, 1::2] <= height).all()
        assert (found.boxes >= 0).all()
        assert (found.boxes[:, 2:] >= found.boxes[:, :2]).all()


# --- both adapters inside functional_call ---------------------------------------------------


def segmentation_case() -> tuple[str, torch.Size, torch.Tensor]:
    return "segmentation", torch.Size((2, 1, 64, 80)), torch.randint(0, 9, (2, 64, 80))


def detection_case() -> tuple[str, torch.Size, torch.Tensor]:
    return "detection", torch.Size((2, 1, 96, 128)), m3fd_targets()


@pytest.mark.parametrize("case", [segmentation_case, detection_case], ids=["seg", "det"])
def test_one_step_clone_with_functional_call(
    case, segmentation_task: SegmentationTask, detection_task: DetectionTask
) -> None:
    kind, shape, target = case()
    task = segmentation_task if kind == "segmentation" else detection_task
    task.train()
    fused = torch.rand(shape, requires_grad=True)

    def loss_of(module: nn.Module, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        torch.manual_seed(1)  # SegFormer's drop path draws the same masks on every call
        if params is None:
            return module(fused, target)
        return functional_call(module, params, (fused, target), strict=False)

    params = {name: p for name, p in task.named_parameters() if p.requires_grad}
    loss = loss_of(task, params)
    (fused_gradient,) = torch.autograd.grad(loss, fused, retain_graph=True)
    assert_useful_gradient(fused_gradient)
    grads = torch.autograd.grad(loss, tuple(params.values()), allow_unused=True)
    learning_rate = 1e-2
    stepped = {
        name: p if g is None else p - learning_rate * g
        for (name, p), g in zip(params.items(), grads)
    }
    assert sum(g is not None for g in grads) > 0.9 * len(grads)

    reference = copy.deepcopy(task)
    with torch.no_grad():
        reference_params = dict(reference.named_parameters())
        for name, g in zip(params, grads):
            if g is not None:
                reference_params[name].sub_(learning_rate * g)
    clone_loss = loss_of(task, stepped)
    assert not torch.isclose(clone_loss, loss_of(task)), "the substituted parameters were ignored"
    torch.testing.assert_close(clone_loss, loss_of(reference), rtol=1e-4, atol=1e-5)
    (clone_gradient,) = torch.autograd.grad(clone_loss, fused)
    assert_useful_gradient(clone_gradient)


# --- optional dependencies and side effects -------------------------------------------------


def hide_modules(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    for name in [name for name in sys.modules if name.split(".")[0] == prefix]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, prefix, None)


def test_detection_without_ultralytics_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    load_ultralytics.cache_clear()
    hide_modules(monkeypatch, "ultralytics")
    try:
        with pytest.raises(OptionalDependencyError, match=r"pip install 'tdfusion\[det\]'"):
            DetectionTask(num_classes=2)
        found = Detections(torch.zeros(1, 4), torch.ones(1), torch.zeros(1, dtype=torch.long))
        with pytest.raises(OptionalDependencyError, match=r"tdfusion\[det\]"):
            DetectionScore().update([found], torch.tensor([[0, 0, 0.5, 0.5, 0.1, 0.1]]), (8, 8))
    finally:
        load_ultralytics.cache_clear()


def test_old_ultralytics_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    load_ultralytics()  # imported for real, then pretend it is an older release
    load_ultralytics.cache_clear()
    monkeypatch.setattr(sys.modules["ultralytics"], "__version__", "8.3.40")
    try:
        with pytest.raises(OptionalDependencyError, match=r"ultralytics>=8\.4, found 8\.3\.40"):
            load_ultralytics()
    finally:
        load_ultralytics.cache_clear()


def test_segmentation_without_smp_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    hide_modules(monkeypatch, "segmentation_models_pytorch")
    with pytest.raises(OptionalDependencyError, match=r"pip install 'tdfusion\[seg\]'"):
        SegmentationTask(num_classes=2)


OFFLINE_SCRIPT = """
import json, os, socket, sys
calls = []
def refuse(name):
    def blocked(*args, **kwargs):
        calls.append(name)
        raise OSError("network access is blocked in this test")
    return blocked
socket.socket.connect = refuse("connect")
socket.socket.connect_ex = refuse("connect_ex")
socket.getaddrinfo = refuse("getaddrinfo")
socket.create_connection = refuse("create_connection")

import numpy
import torch
from PIL import Image
save = torch.save
image_open = Image.open
print_options = (numpy.get_printoptions(), torch._tensor_str.get_printoptions())
import tdfusion.tasks as tasks
lazy = not any(name in sys.modules for name in ("ultralytics", "segmentation_models_pytorch"))

detection = tasks.DetectionTask(num_classes=2)
fused = torch.rand(1, 1, 64, 64, requires_grad=True)
detection(fused, torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.4]])).backward()
found = detection.predict(fused.detach(), conf=0.001)
score = tasks.DetectionScore()
score.update(found, torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.4]]), (64, 64))
score.compute()
segmentation = tasks.SegmentationTask(num_classes=3)
segmentation(fused, torch.zeros(1, 64, 64, dtype=torch.long)).backward()
segmentation.predict(fused.detach())
print(json.dumps({
    "calls": calls,
    "lazy": lazy,
    "torch_save_restored": torch.save is save,
    "image_open_restored": Image.open is image_open,
    "print_options_restored": print_options
    == (numpy.get_printoptions(), torch._tensor_str.get_printoptions()),
    "omp": os.environ.get("OMP_NUM_THREADS"),
    "yolo_config_dir": os.environ.get("YOLO_CONFIG_DIR"),
}))
"""


def test_no_network_and_nothing_written_to_home(tmp_path: Path) -> None:
    home, temporary = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    temporary.mkdir()
    script = tmp_path / "offline.py"
    script.write_text(textwrap.dedent(OFFLINE_SCRIPT))
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("XDG_", "YOLO_", "OMP_", "HF_", "TORCH_HOME", "MPLCONFIGDIR"))
    }
    environment.update(HOME=str(home), TMPDIR=str(temporary), PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, str(script)],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["calls"] == []
    assert report["lazy"]
    assert report["torch_save_restored"] and report["print_options_restored"]
    assert report["image_open_restored"]  # PIL errors stay PIL errors after the import
    assert report["omp"] is None and report["yolo_config_dir"] is None
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*")) == []
    settings = list(temporary.glob("tdfusion-ultralytics-*/Ultralytics/settings.json"))
    assert len(settings) == 1
    assert "Ultralytics Settings" not in result.stdout


# --- segmentation score ---------------------------------------------------------------------


def test_segmentation_score_known_confusion_matrix() -> None:
    # labels      0 0 1 1 2 2
    # predictions 0 1 1 1 2 0   -> IoU 1/3, 2/3, 1/2; Acc 1/2, 1, 1/2
    score = SegmentationScore(num_classes=3)
    score.update(torch.tensor([[[0, 1, 1]]]), torch.tensor([[[0, 0, 1]]]))
    score.update(torch.tensor([[[1, 2, 0]]]), torch.tensor([[[1, 2, 2]]]))
    assert score.confusion_matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    result = score.compute()
    assert result["IoU"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert result["Acc"] == pytest.approx([1 / 2, 1, 1 / 2])
    assert result["mIoU"] == pytest.approx(0.5)
    assert result["mAcc"] == pytest.approx(2 / 3)
    assert result["aAcc"] == pytest.approx(4 / 6)


def test_segmentation_score_perfect_and_reset() -> None:
    labels = torch.randint(0, 4, (2, 8, 8))
    score = SegmentationScore(num_classes=4)
    score.update(labels, labels)
    assert score.compute()["mIoU"] == pytest.approx(1.0)
    assert score.compute()["mAcc"] == pytest.approx(1.0)
    score.reset()
    assert score.confusion_matrix.sum() == 0


def test_segmentation_score_absent_class_and_scores_input() -> None:
    # Class 2 is never labelled: Acc nan; predicted once, so IoU 0. Class 3 never appears: nan.
    target = torch.tensor([[[0, 0, 1, 1]]])
    prediction = torch.tensor([[[0, 2, 1, 1]]])
    scores = torch.nn.functional.one_hot(prediction, 4).permute(0, 3, 1, 2).float()
    score = SegmentationScore(num_classes=4)
    score.update(scores, target)
    result = score.compute()
    assert result["IoU"][:3] == pytest.approx([1 / 2, 1, 0])
    assert math.isnan(result["IoU"][3])
    assert math.isnan(result["Acc"][2]) and math.isnan(result["Acc"][3])
    assert result["mIoU"] == pytest.approx(0.5)
    assert result["mAcc"] == pytest.approx(0.75)


def test_segmentation_score_ignore_index() -> None:
    target = torch.tensor([[[0, 255, 1, 255]]])
    prediction = torch.tensor([[[0, 1, 1, 0]]])
    score = SegmentationScore(num_classes=2, ignore_index=255)
    score.update(prediction, target)
    assert score.compute()["mIoU"] == pytest.approx(1.0)
    with pytest.raises(DataError, match="255"):
        SegmentationScore(num_classes=2).update(prediction, target)
    with pytest.raises(ValueError, match="same size"):
        score.update(prediction[..., :2], target)


# --- detection score ------------------------------------------------------------------------


def boxes_to_targets(
    image: int, classes: list[int], boxes: torch.Tensor, size: int
) -> torch.Tensor:
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 / size
    extent = (boxes[:, 2:] - boxes[:, :2]) / size
    return torch.cat(
        (
            torch.full((len(classes), 1), float(image)),
            torch.tensor(classes)[:, None].float(),
            centre,
            extent,
        ),
        dim=1,
    )


def detections(boxes: list[list[float]], scores: list[float], classes: list[int]) -> Detections:
    return Detections(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(scores),
        torch.tensor(classes, dtype=torch.long),
    )


def test_detection_score_perfect_predictions() -> None:
    # ultralytics' interpolated AP tops out at 0.995 (precision 0 at the recall-1 sentinel).
    first = torch.tensor([[10.0, 10, 40, 50], [60, 20, 90, 70]])
    second = torch.tensor([[5.0, 5, 30, 30]])
    targets = torch.cat(
        (boxes_to_targets(0, [0, 1], first, 100), boxes_to_targets(1, [1], second, 100))
    )
    score = DetectionScore()
    score.update(
        [detections(first.tolist(), [0.9, 0.8], [0, 1]), detections(second.tolist(), [0.7], [1])],
        targets,
        image_size=(100, 100),
    )
    result = score.compute()
    assert result["mAP50"] == pytest.approx(0.995)
    assert result["mAP75"] == pytest.approx(0.995)
    assert result["mAP50-95"] == pytest.approx(0.995)
    assert set(result["per_class"]) == {0, 1}


def test_detection_score_partial_overlap_counts_low_thresholds_only() -> None:
    # IoU 0.68 is a hit at 0.50, 0.55, 0.60, 0.65 and a miss from 0.70 on: 4 of 10 thresholds.
    truth = torch.tensor([[0.0, 0, 10, 10]])
    score = DetectionScore()
    score.update(
        [detections([[0, 0, 10, 6.8]], [0.9], [3])], boxes_to_targets(0, [3], truth, 20), (20, 20)
    )
    result = score.compute()
    assert result["mAP50"] == pytest.approx(0.995)
    assert result["mAP75"] == pytest.approx(0.0)
    assert result["mAP50-95"] == pytest.approx(0.995 * 4 / 10)
    assert result["per_class"][3]["AP75"] == pytest.approx(0.0)


def test_detection_score_misses_false_positives_and_order() -> None:
    truth = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]])
    targets = boxes_to_targets(0, [0, 0], truth, 40)

    missed = DetectionScore()  # one of two objects found: recall 1/2
    missed.update([detections([[0, 0, 10, 10]], [0.9], [0])], targets, (40, 40))
    assert missed.compute()["mAP50"] == pytest.approx(0.5, abs=0.01)

    # A false positive ranked below both hits costs nothing; ranked above them it does. The
    # detections are given unsorted: the score must sort them by confidence.
    boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [30, 0, 40, 10]]
    low = DetectionScore()
    low.update([detections(boxes, [0.8, 0.9, 0.1], [0, 0, 0])], targets, (40, 40))
    high = DetectionScore()
    high.update([detections(boxes, [0.8, 0.7, 0.95], [0, 0, 0])], targets, (40, 40))
    assert low.compute()["mAP50"] == pytest.approx(0.995)
    assert high.compute()["mAP50"] < 0.9

    wrong_class = DetectionScore()
    wrong_class.update([detections(boxes[:2], [0.9, 0.8], [1, 1])], targets, (40, 40))
    assert wrong_class.compute()["per_class"][0]["AP50"] == pytest.approx(0.0)


def test_detection_score_empty_and_bad_input() -> None:
    score = DetectionScore()
    assert score.compute() == {"mAP50": 0.0, "mAP75": 0.0, "mAP50-95": 0.0, "per_class": {}}
    score.update([detections([], [], [])], torch.zeros(0, 6), (8, 8))
    assert score.compute()["mAP50"] == 0.0
    with pytest.raises(DataError, match="1 detection lists"):
        score.update([detections([], [], [])], torch.tensor([[1, 0, 0.5, 0.5, 0.1, 0.1]]), (8, 8))
    with pytest.raises(ValueError, match=r"\(M, 6\)"):
        score.update([detections([], [], [])], torch.zeros(2, 4), (8, 8))


@pytest.mark.parametrize("kind", ["segmentation", "detection"])
def test_adapters_train_as_the_task_network_inside_the_trainer(kind: str) -> None:
    from tdfusion import LossGenerator, MetaFusionTrainer
    from tdfusion.nets import ReFusionNet

    torch.manual_seed(0)
    if kind == "segmentation":
        task = SegmentationTask(num_classes=3)
        target = torch.randint(0, 3, (2, 48, 64))
    else:
        task = DetectionTask(num_classes=2)
        target = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 0, 0.3, 0.6, 0.2, 0.2]])
    trainer = MetaFusionTrainer(
        ReFusionNet(dim=8, num_blocks=1, num_heads=2),
        task,
        LossGenerator(dim=8, num_blocks=1, num_heads=2),
        fusion_crop=32,
        device="cpu",
    )
    batch = (torch.rand(2, 1, 48, 64), torch.rand(2, 1, 48, 64), target)
    other = (torch.rand(2, 1, 48, 64), torch.rand(2, 1, 48, 64), target)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    stats = trainer.meta_step(batch, other)
    assert all(math.isfinite(v) for v in stats.values()) and stats["hypergradient_max"] > 0
    for key, value in task.state_dict().items():  # T' was temporary: T is as it was
        assert torch.equal(value, before[key]), key
    stats = trainer.fusion_step(batch)
    assert math.isfinite(stats["task_loss"])
    assert any(not torch.equal(v, before[k]) for k, v in task.state_dict().items())
