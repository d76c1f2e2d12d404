"""The demo's protocol: learned against fixed loss, same seed and budget, held-out scoring.

Each *arm* fine-tunes the same pretrained fusion network ``F`` and trains a YOLOv8-n detector
``T`` from scratch on some sample pairs; the arms differ only in the fusion loss:

- ``"learned"``: the weights come from a :class:`~tdfusion.LossGenerator` that meta steps
  train from the detector's loss (the method);
- ``"fixed"``: ``w_a = w_b = 1/2`` (:class:`~tdfusion.nets.FixedLossWeights`, no meta steps),
  the hand-made loss of the paper's ablation.

Both arms see the same pairs in the same order, the same crops and the same initial ``T``
(one seed), and take the same number of ``F`` and ``T`` updates. The sample's pairs are split
into folds; each fold's pairs are scored, by each arm trained on the other folds, with the
detector's own loss and mAP, and the two arms are compared pair by pair.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tdfusion.demo.arm import (  # noqa: F401 (the protocol's parts, also importable here)
    ArmRun,
    WeightTracker,
    _build_trainer,
    _initial_fusion_model,
    _load_sample,
    _Pair,
    fold_split,
    run_arm,
)
from tdfusion.demo.comparison import compare_arms
from tdfusion.demo.settings import _ARM_TITLES, ARMS, DemoSettings
from tdfusion.files import atomic_path

__all__ = ["run_demo"]


def run_demo(
    out: str | Path = "demo_out",
    settings: DemoSettings | None = None,
    *,
    device: str | None = None,
    resume: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Run both arms on every fold and seed, compare them and draw the pictures into ``out``.

    Writes ``summary.json`` and ``summary.txt`` (the comparison), ``runs/seed<S>-fold<K>-<arm>/``
    (what every run was trained with, its checkpoint, log and weights),
    ``fused/<arm>/<pair>.png`` (the held-out fused colour images), ``compare_<pair>.png``
    (infrared | visible | fixed-loss fusion | learned-loss fusion | ``w_a``),
    ``weight_maps/<pair>.png`` and ``training_curve.png``.

    Parameters
    ----------
    out : str or pathlib.Path
        Output folder (created).
    settings : DemoSettings, optional
        The protocol; :class:`DemoSettings` defaults when omitted.
    device : str, optional
        Training device; CUDA when available by default.
    resume : bool
        Continue every run from its checkpoint (finished runs are only scored again); a run
        trained with other settings or on other pairs (another ``folds``) is refused with a
        :class:`~tdfusion.errors.CheckpointError`.
    progress : bool
        Show progress bars (one line per run with several workers).
    workers : int, optional
        Runs trained at once, each in its own process with one thread. Every run is seeded by
        itself, so the results do not depend on it (up to the rounding of multi-threaded
        kernels). Default: on the CPU, as many as there are cores, up to 4 and the number
        of runs (two processes of one thread use two cores better than one process of two
        threads on these small tensors); one on a GPU.

    Returns
    -------
    dict
        ``"text"`` (the printed summary), ``"summary"`` (what ``summary.json`` holds),
        ``"runs"`` (the :class:`ArmRun` objects) and the paths written: ``"summary_json"``,
        ``"comparisons"``, ``"weight_maps"``, ``"fused"``, ``"curve"``.
    """
    from tdfusion.data.io import write_image
    from tdfusion.demo import figures
    from tdfusion.inference.colour import merge_chroma

    started = time.perf_counter()
    settings = settings or DemoSettings()
    out = Path(out)
    sample = _load_sample(settings.image_size)
    pairs, classes = sample
    # Settings that cannot work fail here, before anything is written or trained.
    splits = fold_split([pair.name for pair in pairs], settings.folds)
    _initial_fusion_model(settings.init_weights)
    out.mkdir(parents=True, exist_ok=True)
    # The learned arm's runs take longest: start them first so that parallel workers finish
    # together.
    jobs = [
        (seed, fold, arm)
        for arm in ARMS
        for seed in settings.seeds
        for fold in range(settings.folds)
    ]
    workers = _default_workers(device, len(jobs)) if workers is None else max(1, int(workers))

    def describe(seed: int, fold: int, arm: str) -> str:
        train, test = splits[fold]
        return (
            f"{_ARM_TITLES[arm]}, seed {seed}, fold {fold}: training on {', '.join(train)}, "
            f"scoring {', '.join(test)}"
        )

    def folder(seed: int, fold: int, arm: str) -> Path:
        return out / "runs" / f"seed{seed}-fold{fold}-{arm}"

    finished: dict[tuple[int, int, str], ArmRun] = {}
    if workers == 1:
        for index, job in enumerate(jobs):
            if progress:
                print(f"[{index + 1}/{len(jobs)}] {describe(*job)}", flush=True)
            finished[job] = run_arm(
                settings,
                job[2],
                job[0],
                job[1],
                folder(*job),
                device=device,
                resume=resume,
                progress=progress,
                sample=sample,
            )
    else:
        if progress:
            print(f"{len(jobs)} runs in {workers} processes of one thread each", flush=True)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
            futures = {
                pool.submit(
                    run_arm,
                    settings,
                    job[2],
                    job[0],
                    job[1],
                    folder(*job),
                    device=device,
                    resume=resume,
                    progress=False,
                ): job
                for job in jobs
            }
            for future in as_completed(futures):
                job = futures[future]
                finished[job] = future.result()
                if progress:
                    print(
                        f"[{len(finished)}/{len(jobs)}] done in "
                        f"{finished[job].seconds:.0f} s: {describe(*job)}",
                        flush=True,
                    )
    # Reported in a fixed order, whatever order the runs finished in.
    runs = [
        finished[(seed, fold, arm)]
        for seed in settings.seeds
        for fold in range(settings.folds)
        for arm in ARMS
    ]
    comparison = compare_arms(runs)

    # Pictures: every pair as fused by each arm of the first seed that did not train on it.
    first_seed = settings.seeds[0]
    fused_written: list[Path] = []
    comparisons: list[Path] = []
    weight_maps: list[Path] = []
    for pair in pairs:
        held = {
            run.arm: run for run in runs if run.seed == first_seed and pair.name in run.test_names
        }
        colour = {}
        for arm, run in held.items():
            colour[arm] = merge_chroma(run.fused[pair.name] * 255.0, pair.chroma_a, pair.chroma_b)
            fused_written.append(write_image(out / "fused" / arm / f"{pair.name}.png", colour[arm]))
        sources = (
            merge_chroma(pair.a[0].numpy() * 255.0, pair.chroma_a, None),
            merge_chroma(pair.b[0].numpy() * 255.0, None, pair.chroma_b),
        )
        learned = held.get("learned")
        weight_a = learned.weight_a[pair.name] if learned is not None else None
        comparisons.append(
            figures.comparison_figure(
                out / f"compare_{pair.name}.png",
                pair.name,
                sources,
                {arm: (colour[arm], held[arm].held_out[pair.name]) for arm in held},
                weight_a,
                pair.boxes,
                classes,
            )
        )
        if weight_a is not None:
            weight_maps.append(
                figures.weight_map_figure(
                    out / "weight_maps" / f"{pair.name}.png",
                    pair.name,
                    weight_a,
                    sources[1],
                    pair.boxes,
                )
            )
    curve = figures.training_curve_figure(out / "training_curve.png", runs, settings)

    minutes = (time.perf_counter() - started) / 60
    summary = {
        "settings": settings.to_dict(),
        "pairs": [pair.name for pair in pairs],
        "classes": list(classes),
        "folds": [
            {"train": train, "test": test}
            for train, test in fold_split([pair.name for pair in pairs], settings.folds)
        ],
        **comparison,
        "runs": [
            {
                "arm": run.arm,
                "seed": run.seed,
                "fold": run.fold,
                "train": run.train_names,
                "test": run.test_names,
                "held_out": run.held_out,
                "detection": run.detection,
                "weight_curve": run.weight_curve,
                "final_epoch": run.history[-1] if run.history else {},
                "folder": str(run.folder),
                "seconds": run.seconds,
            }
            for run in runs
        ],
        "minutes": minutes,
    }
    text = _summary_text(summary, settings, out, minutes)
    summary["text"] = text
    summary_json = out / "summary.json"
    with atomic_path(summary_json) as temporary:
        temporary.write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
    with atomic_path(out / "summary.txt") as temporary:
        temporary.write_text(text + "\n")
    return {
        "text": text,
        "summary": summary,
        "runs": runs,
        "summary_json": summary_json,
        "comparisons": comparisons,
        "weight_maps": weight_maps,
        "fused": fused_written,
        "curve": curve,
    }


def _default_workers(device: str | None, jobs: int) -> int:
    from tdfusion.devices import resolve_device

    if resolve_device(device).type != "cpu":
        return 1
    return max(1, min(4, os.cpu_count() or 1, jobs))


def _one_thread() -> None:
    """Worker initialiser: one torch thread per process (the processes share the cores)."""
    torch.set_num_threads(1)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not serialisable: {type(value).__name__}")


def _summary_text(
    summary: dict[str, Any], settings: DemoSettings, out: Path, minutes: float
) -> str:
    arms = summary["arms"]
    start = settings.init_weights or "random initialisation"
    lines = [
        f"TDFusion demo finished in {minutes:.1f} min.",
        f"Two arms, fine-tuning the fusion network from {start} and training a YOLOv8-n "
        f"detector ({', '.join(summary['classes'])}) from scratch, {settings.epochs} epochs, "
        f"seed(s) {', '.join(str(s) for s in settings.seeds)}:",
        f"  learned loss: w_a from the loss generator, {settings.meta_steps} meta step(s) per "
        f"epoch (generator_lr {settings.generator_lr:g})",
        "  fixed loss:   w_a = w_b = 1/2 (the baseline; no meta steps)",
        f"Scored on held-out pairs: {settings.folds}-fold cross-validation over the "
        f"{len(summary['pairs'])} sample pairs (each pair scored by the runs that did not "
        "train on it). Mean (std):",
    ]
    rows = [
        ("held-out task loss", "task_loss", "{:.3f}"),
        ("held-out mAP50", "mAP50", "{:.3f}"),
        ("held-out mAP50-95", "mAP50-95", "{:.3f}"),
        ("VIF", "VIF", "{:.3f}"),
        ("Qabf", "Qabf", "{:.3f}"),
    ]
    header = f"  {'':20s}" + "".join(f"{_ARM_TITLES[arm].split(' (')[0]:>22s}" for arm in arms)
    lines.append(header)
    for label, key, template in rows:
        cells = ""
        for arm in arms:
            mean, std = arms[arm][key]["mean"], arms[arm][key]["std"]
            cells += f"{template.format(mean)} ({template.format(std)})".rjust(22)
        lines.append(f"  {label:20s}{cells}")
    learned_curves = [run["weight_curve"] for run in summary["runs"] if run["weight_curve"]]
    if learned_curves:
        first = np.mean([[c[0]["inside"], c[0]["outside"]] for c in learned_curves], axis=0)
        last = np.mean([[c[-1]["inside"], c[-1]["outside"]] for c in learned_curves], axis=0)
        lines.append(
            f"Learned w_a inside / outside the objects: {first[0]:.3f} / {first[1]:.3f} before "
            f"training, {last[0]:.3f} / {last[1]:.3f} after (fixed loss: 0.5 everywhere)."
        )
    lines.append(summary["verdict"])
    lines += [
        f"  summary         {out / 'summary.json'}",
        f"  comparisons     {out}/compare_<pair>.png (infrared | visible | fixed | learned | w_a)",
        f"  weight maps     {out / 'weight_maps'}",
        f"  training curve  {out / 'training_curve.png'}",
        f"  fused images    {out / 'fused'}/<arm>/",
        f"  runs            {out / 'runs'}/seed<S>-fold<K>-<arm>/ (checkpoint.pt: resume with "
        "--resume; fusion_model.pt: tdfusion fuse --weights ...)",
    ]
    return "\n".join(lines)
