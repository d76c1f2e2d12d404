"""The comparison of the two arms: paired held-out differences, their spread, and the verdict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tdfusion.demo.arm import ArmRun
from tdfusion.demo.settings import ARMS

__all__ = ["compare_arms"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def compare_arms(runs: Sequence[ArmRun], min_runs: int = 3) -> dict[str, Any]:
    """Compare the arms on the held-out pairs, run by run (same seed and fold).

    For every seed and fold, the learned arm's held-out task loss minus the fixed arm's is
    taken pair by pair and averaged over the fold's pairs. The pairs of one fold are scored
    by the same two networks, so the independent evidence is the *run* (seed and fold), not
    the pair: the difference is called *measurable* only when there are at least
    ``min_runs`` runs per arm and the mean over runs is more than twice its standard error
    away from zero. mAP50 is compared in the same way.

    Parameters
    ----------
    runs : sequence of ArmRun
        Runs of both arms over the same folds and seeds.
    min_runs : int
        Fewest runs per arm from which a difference can be called measurable.

    Returns
    -------
    dict
        ``"arms"``: per arm the mean and standard deviation over held-out pairs of the task
        loss and the fusion metrics, and over runs of mAP50 and mAP50-95;
        ``"task_loss_difference"`` and ``"map50_difference"``: ``{"mean", "stderr", "runs",
        "per_run", "measurable"}`` plus, for the loss, ``"pair_std"`` and ``"pairs"`` (the
        spread over the held-out pairs); ``"verdict"``: one sentence saying what they show.
    """
    from tdfusion.metrics import METRIC_NAMES

    arms: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        mine = [run for run in runs if run.arm == arm]
        if not mine:
            continue
        per_pair = [scores for run in mine for scores in run.held_out.values()]
        entry: dict[str, Any] = {}
        for key in ("task_loss", *METRIC_NAMES):
            mean, std = _mean_std([scores[key] for scores in per_pair])
            entry[key] = {"mean": mean, "std": std}
        for key in ("mAP50", "mAP50-95"):
            mean, std = _mean_std([run.detection[key] for run in mine])
            entry[key] = {"mean": mean, "std": std}
        arms[arm] = entry

    learned = {(r.seed, r.fold): r for r in runs if r.arm == "learned"}
    fixed = {(r.seed, r.fold): r for r in runs if r.arm == "fixed"}
    matched = [(learned[key], fixed[key]) for key in sorted(set(learned) & set(fixed))]

    def paired(per_run: list[float]) -> dict[str, Any]:
        mean, std = _mean_std(per_run)
        count = len(per_run)
        stderr = std / math.sqrt(count) if count > 1 else math.nan
        measurable = bool(count >= min_runs and abs(mean) > 2 * stderr)
        return {
            "mean": mean,
            "stderr": stderr,
            "runs": count,
            "per_run": per_run,
            "measurable": measurable,
        }

    pair_differences = [
        a.held_out[name]["task_loss"] - b.held_out[name]["task_loss"]
        for a, b in matched
        for name in a.test_names
    ]
    loss_difference = paired(
        [
            float(
                np.mean(
                    [a.held_out[n]["task_loss"] - b.held_out[n]["task_loss"] for n in a.test_names]
                )
            )
            for a, b in matched
        ]
    )
    loss_difference["pair_std"] = _mean_std(pair_differences)[1]
    loss_difference["pairs"] = len(pair_differences)
    map_difference = paired([a.detection["mAP50"] - b.detection["mAP50"] for a, b in matched])
    return {
        "arms": arms,
        "task_loss_difference": loss_difference,
        "map50_difference": map_difference,
        "verdict": _verdict(loss_difference, map_difference, min_runs),
    }


def _verdict(loss: dict[str, Any], map50: dict[str, Any], min_runs: int) -> str:
    """One honest sentence about the held-out differences (learned - fixed): the task loss
    first, and the mAP50 whenever its difference is, or is not, measurable where the loss's
    is not, or is."""
    spread = (
        f"learned - fixed held-out task loss {loss['mean']:+.3f} (std {loss['pair_std']:.3f} "
        f"over {loss['pairs']} held-out pairs"
    )
    if loss["runs"] > 1:
        spread += f", standard error {loss['stderr']:.3f} over {loss['runs']} runs"
    spread += f"), mAP50 {map50['mean']:+.3f}"
    if map50["runs"] > 1:
        spread += f" (standard error {map50['stderr']:.3f})"
    if loss["runs"] < min_runs:
        return (
            f"No measurable difference at this budget: {spread}; {loss['runs']} training "
            f"run(s) per arm cannot separate the arms from training noise (a difference needs "
            f"at least {min_runs}: add seeds with --seeds)."
        )
    map_direction = "higher" if map50["mean"] > 0 else "lower"
    if not loss["measurable"]:
        if map50["measurable"]:
            return (
                f"No measurable difference in held-out task loss at this budget, but the "
                f"learned loss gave a {map_direction} mAP50 than the fixed loss, beyond twice "
                f"its standard error: {spread}."
            )
        return f"No measurable difference at this budget: {spread}."
    better = "lower" if loss["mean"] < 0 else "higher"
    sentence = (
        f"The learned loss gave the detector a {better} held-out loss than the fixed loss, "
        f"beyond twice its standard error: {spread}"
    )
    if map50["measurable"]:
        return f"{sentence}; its mAP50 was {map_direction}, also beyond twice its standard error."
    return f"{sentence}; the mAP50 difference is within twice its standard error."


# ---------------------------------------------------------------------------- the whole demo
