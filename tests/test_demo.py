"""``tdfusion demo``: the two-arm protocol, its comparison, its pictures and its resume."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tdfusion.demo import ArmRun, DemoSettings, WeightTracker, compare_arms, fold_split, run_demo
from tdfusion.demo.figures import weight_range
from tdfusion.metrics import METRIC_NAMES
from tdfusion.nets import ReFusionNet

#: The whole pipeline at a tenth of the pixels, from a random fusion network: seconds, not minutes.
TINY = DemoSettings(
    epochs=1,
    seeds=(0,),
    meta_steps=1,
    init_weights=None,
    image_size=(96, 128),
    task_size=(64, 96),
    map_size=(48, 64),
    fusion_crop=48,
)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, TINY, device="cpu", progress=False, workers=2)


def test_demo_writes_summary_comparisons_maps_curve_and_runs(tiny_demo):
    out, result = tiny_demo
    summary = json.loads(result["summary_json"].read_text())
    assert set(summary["arms"]) == {"learned", "fixed"}
    for arm in ("learned", "fixed"):
        assert {"task_loss", "mAP50", "mAP50-95", "VIF", "Qabf"} <= set(summary["arms"][arm])
    difference = summary["task_loss_difference"]
    assert (difference["pairs"], difference["runs"]) == (4, 2)  # every pair held out once
    assert len(summary["runs"]) == 4  # two folds, two arms
    for run in summary["runs"]:
        assert not set(run["train"]) & set(run["test"])
    assert [p.name for p in result["comparisons"]] == [
        f"compare_{name}.png" for name in summary["pairs"]
    ]
    assert len(result["weight_maps"]) == 4 and len(result["fused"]) == 8
    assert result["curve"].is_file()
    for folder in (out / "runs").iterdir():
        assert (folder / "checkpoint.pt").is_file() and (folder / "fusion_model.pt").is_file()
    assert (out / "runs" / "seed0-fold0-learned" / "loss_generator.pt").is_file()
    for line in ("fixed loss", "learned loss", "held-out task loss", "VIF", "summary"):
        assert line in result["text"]
    assert summary["verdict"] in result["text"]


def test_demo_resume_keeps_finished_runs_in_one_process_too(tiny_demo, tmp_path):
    out, first = tiny_demo  # trained by two worker processes
    logs = {p: p.read_text() for p in (out / "runs").glob("*/training_log.csv")}
    again = run_demo(out, TINY, device="cpu", progress=False, resume=True, workers=1)
    assert {p: p.read_text() for p in logs} == logs  # nothing retrained
    for before, after in zip(first["runs"], again["runs"]):
        assert after.history == before.history
        for name, scores in before.held_out.items():
            assert after.held_out[name] == pytest.approx(scores)


def test_fixed_arm_keeps_equal_weights_and_learned_arm_moves(tiny_demo):
    _, result = tiny_demo
    learned = [run for run in result["runs"] if run.arm == "learned"]
    fixed = [run for run in result["runs"] if run.arm == "fixed"]
    assert all(run.weight_curve == [] and run.weight_a == {} for run in fixed)
    for run in learned:
        epochs = [record["epoch"] for record in run.weight_curve]
        assert epochs == [0, 1]
        assert run.weight_curve[0]["mean"] != run.weight_curve[1]["mean"]


@pytest.mark.parametrize("folds", [2, 3, 4])
def test_fold_split_tests_every_pair_once(folds):
    names = ["a", "b", "c", "d"]
    splits = fold_split(names, folds)
    tested = sorted(name for _, test in splits for name in test)
    assert tested == names
    for train, test in splits:
        assert sorted(train + test) == names and len(train) >= 2


@pytest.mark.parametrize("folds", [1, 5])
def test_fold_split_refuses_impossible_folds(folds):
    with pytest.raises(ValueError, match="folds"):
        fold_split(["a", "b", "c", "d"], folds)


def _run(arm, fold, losses, map50=0.0):
    metrics = {name: 0.5 for name in METRIC_NAMES}
    held_out = {name: {"task_loss": loss, **metrics} for name, loss in losses.items()}
    return ArmRun(
        arm,
        0,
        fold,
        [],
        sorted(losses),
        folder=None,  # type: ignore[arg-type]
        held_out=held_out,
        detection={"mAP50": map50, "mAP50-95": map50 / 2},
    )


def _runs(learned, fixed):
    """Runs of both arms, one fold per entry: ``{pair: loss}`` each."""
    return [_run("learned", k, losses) for k, losses in enumerate(learned)] + [
        _run("fixed", k, losses) for k, losses in enumerate(fixed)
    ]


def test_compare_arms_calls_a_difference_consistent_over_runs_measurable():
    runs = _runs(
        [{"a": 1.0, "b": 2.0}, {"c": 3.0, "d": 4.0}, {"e": 2.0, "f": 2.0}],
        [{"a": 1.5, "b": 2.6}, {"c": 3.4, "d": 4.5}, {"e": 2.5, "f": 2.5}],
    )
    result = compare_arms(runs)
    difference = result["task_loss_difference"]
    assert (difference["runs"], difference["pairs"]) == (3, 6)
    assert difference["per_run"] == pytest.approx([-0.55, -0.45, -0.5])
    assert difference["measurable"]
    assert "lower held-out loss" in result["verdict"]
    assert result["arms"]["fixed"]["task_loss"]["mean"] == pytest.approx(17.0 / 6)


def test_compare_arms_says_no_measurable_difference_for_noise():
    runs = _runs(
        [{"a": 1.0, "b": 2.0}, {"c": 3.0, "d": 4.0}, {"e": 2.0, "f": 2.0}],
        [{"a": 1.5, "b": 2.6}, {"c": 2.4, "d": 3.5}, {"e": 2.0, "f": 2.1}],
    )
    result = compare_arms(runs)
    assert not result["task_loss_difference"]["measurable"]
    assert result["verdict"].startswith("No measurable difference at this budget")
    assert "std" in result["verdict"] and "3 runs" in result["verdict"]


def test_verdict_reports_a_measurable_map_difference_when_the_loss_shows_none():
    # learned - fixed task loss -0.01, +0.01, +0.01, -0.01 (noise); mAP50 +0.2 every run
    runs = []
    for fold, wobble in enumerate((-0.01, 0.01, 0.01, -0.01)):
        pairs = {f"p{fold}": 1.0}
        runs.append(_run("learned", fold, {p: v + wobble for p, v in pairs.items()}, 0.3))
        runs.append(_run("fixed", fold, pairs, 0.1))
    result = compare_arms(runs)
    assert not result["task_loss_difference"]["measurable"]
    assert result["map50_difference"]["measurable"]
    verdict = result["verdict"]
    assert verdict.startswith("No measurable difference in held-out task loss")
    assert "higher mAP50" in verdict and "mAP50 +0.200 (standard error 0.000)" in verdict


def test_compare_arms_claims_nothing_from_too_few_runs():
    # a consistent difference over the pairs of two runs is still two runs
    runs = _runs([{"a": 1.0, "b": 2.0}, {"c": 3.0, "d": 4.0}], [{"a": 2, "b": 3}, {"c": 4, "d": 5}])
    result = compare_arms(runs)
    assert result["task_loss_difference"]["mean"] == -1.0
    assert not result["task_loss_difference"]["measurable"]
    assert result["verdict"].startswith("No measurable difference at this budget")
    assert "--seeds" in result["verdict"]


def test_weight_tracker_measures_inside_and_outside_the_boxes(tmp_path):
    class LeftIsInfrared(torch.nn.Module):
        def forward(self, a, b):  # w_a = 1 on the left half, 0 on the right
            weight_a = torch.zeros_like(a)
            weight_a[..., : a.shape[-1] // 2] = 1.0
            return torch.cat([weight_a, 1 - weight_a], dim=1)

    image = torch.rand(1, 16, 16)
    box_on_the_left = torch.tensor([[0.0, 0.25, 0.5, 0.25, 0.5]])
    tracker = WeightTracker([(image, image, box_on_the_left)], (16, 16), tmp_path / "w.json")
    measured = tracker.measure(LeftIsInfrared())
    assert measured["inside"] == 1.0  # the box (4 x 8 pixels) lies in the left half
    assert measured["outside"] == pytest.approx(96 / 224)  # 128 - 32 left pixels of 256 - 32
    assert measured["mean"] == 0.5


def test_weight_tracker_keeps_the_curve_of_a_resumed_run(tmp_path):
    path = tmp_path / "weight_curve.json"
    pairs = [(torch.rand(1, 8, 8), torch.rand(1, 8, 8), torch.zeros(0, 5))]
    generator = torch.nn.Module()
    generator.forward = lambda a, b: torch.cat([torch.full_like(a, 0.3), 0.7 + 0 * a], dim=1)
    trainer = SimpleNamespace(epoch=0, loss_generator=generator, is_main_process=True)
    tracker = WeightTracker(pairs, (8, 8), path)
    tracker.on_fit_start(trainer)
    trainer.epoch = 1
    tracker.on_epoch_end(trainer, {})
    assert [r["epoch"] for r in json.loads(path.read_text())] == [0, 1]
    assert math.isnan(tracker.records[0]["inside"])  # no boxes

    resumed = WeightTracker(pairs, (8, 8), path)
    trainer.epoch = 2  # the checkpoint of epoch 2 was written, its record was not
    resumed.on_fit_start(trainer)
    assert [r["epoch"] for r in resumed.records] == [0, 1, 2]
    assert resumed.records[-1]["mean"] == pytest.approx(0.3)


def test_weight_range_is_centred_on_equal_weights():
    # A uniform map at 1/2 is widened, so that noise does not look like structure.
    assert weight_range(np.full((4, 4), 0.5)) == (0.475, 0.525)
    # One-sided maps keep 1/2 at the centre: the palette's sides stay infrared and visible.
    assert weight_range(np.full((4, 4), 0.99)) == (0.01, 0.99)
    assert weight_range(np.full((4, 4), 0.3)) == (0.3, 0.7)
    varied = np.linspace(0.2, 0.7, 101)
    low, high = weight_range(varied)
    assert low == pytest.approx(0.205) and high == pytest.approx(0.795)


def test_demo_starts_from_the_bundled_weights_and_says_what_to_do_without_them(monkeypatch):
    from tdfusion.demo import PRETRAINED, protocol
    from tdfusion.errors import CheckpointError

    assert DemoSettings().init_weights == PRETRAINED

    def missing(path, *args, **kwargs):
        raise FileNotFoundError(f"checkpoint {path!r} not found")

    monkeypatch.setattr(ReFusionNet, "from_pretrained", missing)
    with pytest.raises(CheckpointError, match="--init-weights"):
        protocol._initial_fusion_model(PRETRAINED)
    with pytest.raises(CheckpointError, match="initial fusion weights.*my_weights.pt"):
        protocol._initial_fusion_model("my_weights.pt")


def test_demo_refuses_missing_initial_weights_before_writing_anything(tmp_path):
    from tdfusion.errors import CheckpointError

    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="missing.pt"):
        run_demo(out, TINY.replace(init_weights=str(tmp_path / "missing.pt")), progress=False)
    assert not out.exists()


@pytest.mark.parametrize(
    ("changes", "named"), [({"folds": 3}, "train_names"), ({"meta_steps": 2}, "meta_steps")]
)
def test_demo_resume_refuses_runs_trained_on_other_pairs_or_settings(
    tiny_demo, tmp_path, changes, named
):
    """A run trained on fold 0 of two folds must not be scored as fold 0 of three: it trained
    on a pair that split holds out."""
    import shutil

    from tdfusion.errors import CheckpointError

    out, _ = tiny_demo
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(CheckpointError, match=f"other {named}"):
        run_demo(copy, TINY.replace(**changes), progress=False, resume=True, workers=1)
    record = json.loads((copy / "runs" / "seed0-fold0-learned" / "run.json").read_text())
    assert (record["arm"], record["seed"], record["fold"]) == ("learned", 0, 0)
    assert len(record["train_names"]) == 2 and "epochs" not in record["settings"]


def test_demo_settings_refuse_repeated_seeds():
    with pytest.raises(ValueError, match="seeds must differ"):
        DemoSettings().replace(seeds=[0, 0])


def test_demo_command_line_maps_onto_the_settings(monkeypatch, tmp_path):
    from tdfusion.cli import main
    from tdfusion.demo import protocol

    seen = {}

    def fake_run_demo(out, settings, **kwargs):
        seen.update(out=out, settings=settings, **kwargs)
        return {"text": "done"}

    monkeypatch.setattr(protocol, "run_demo", fake_run_demo)
    monkeypatch.setattr("tdfusion.demo.run_demo", fake_run_demo)
    argv = ["demo", "--out", str(tmp_path), "--seeds", "3", "--folds", "4"]
    assert main([*argv, "--init-weights", "w.pt", "--generator-lr", "0.01", "--resume"]) == 0
    settings = seen["settings"]
    assert (settings.seeds, settings.folds, settings.init_weights) == ((3,), 4, "w.pt")
    assert settings.generator_lr == 0.01 and seen["resume"] is True and seen["workers"] is None
    assert settings.epochs == DemoSettings().epochs


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--folds", "5"], "--folds must be between 2 and 4"),
        (["--folds", "1"], "--folds must be between 2 and 4"),
        (["--seeds", "0", "1", "0"], "--seeds repeats 0"),
    ],
)
def test_demo_command_line_refuses_bad_values_in_one_line(tmp_path, capsys, arguments, message):
    from tdfusion.cli import main

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--out", str(out), *arguments])
    assert exited.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert not out.exists()


def test_demo_command_line_reports_missing_initial_weights_in_one_line(tmp_path, capsys):
    from tdfusion.cli import main

    out = tmp_path / "out"
    status = main(["demo", "--out", str(out), "--init-weights", str(tmp_path / "none.pt")])
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "none.pt" in error[0]
    assert not out.exists()
