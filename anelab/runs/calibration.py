"""Thresholds calibrated from plain SD's own attention (STUDIES.md 02): the plain-SD pass that measures
what each resolution reaches, and a study whose guided variants use those thresholds.

This runs the model, so it sits beside the runner, above the core; the quantile itself is the pure
:func:`anelab.analysis.calibrate_thresholds`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pandas as pd
from tqdm import tqdm

from ..analysis import calibrate_thresholds
from ..errors import AnelabError
from ..log import bars_off, note
from ..pipeline import generate
from ..recording import Record
from .runner import prepare, run_sweep
from .study import Study, fit_study, load_study


def source_path(name: str, beside: str) -> str:
    """A calibration source: a built-in study name, a path, or a path relative to the calibrated study's own file."""
    from pathlib import Path

    from ..resources import study_files

    if name in study_files() or Path(name).is_absolute() or Path(name).is_file():
        return name
    relative = Path(beside).parent / name
    return str(relative) if beside and relative.is_file() else name


def calibration_stats(
    pipe,
    prompts: pd.DataFrame | Sequence[tuple[str, Sequence[str]]],
    seeds: Sequence[int] = range(4),
    resolutions: Sequence[int] | None = None,
    num_inference_steps: int = 50,
    size: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the plain-SD pass that :func:`calibrate_thresholds` needs: token statistics (no maps) of every
    prompt (``prompt, tokens`` rows or pairs) and seed at ``resolutions``."""
    pairs = list(zip(prompts.prompt, prompts.tokens)) if isinstance(prompts, pd.DataFrame) else list(prompts)
    if not pairs:
        raise AnelabError("calibration needs at least one (prompt, tokens) pair")
    record = Record(resolutions=resolutions, maps=False)
    frames = []
    for prompt, tokens in tqdm(pairs, desc="calibration (plain SD)", disable=bars_off(progress)):
        out = generate(
            pipe,
            prompt,
            list(tokens),
            seeds=list(seeds),
            num_inference_steps=num_inference_steps,
            height=size,
            width=size,
            output_type="latent",
            record=record,
            progress=False,
        )
        frames.append(out.attention.stats())
    return pd.concat(frames, ignore_index=True)


def calibrated_study(
    study: Study, sd_stats: pd.DataFrame, variants: dict[int, str], quantile: float = 0.5, name: str | None = None
) -> tuple[Study, dict[int, dict[int, float]]]:
    """A copy of ``study`` holding, for each ``{resolution: variant}``, that variant with thresholds
    calibrated from ``sd_stats`` at its own threshold steps (:func:`calibrate_thresholds`), named
    ``<variant>_calibrated`` (plain SD is left out: the study's own SD run is the baseline).
    Returns ``(study, {resolution: thresholds})``."""
    unknown = [v for v in variants.values() if study.variants.get(v) is None]
    if unknown:
        raise AnelabError(f"variant(s) {unknown} are not guided variants of study {study.name!r}")
    thresholds = {
        res: calibrate_thresholds(sd_stats, res, list(study.variants[v].thresholds), quantile)
        for res, v in variants.items()
    }
    configs = {f"{v}_calibrated": study.variants[v].replace(thresholds=thresholds[res]) for res, v in variants.items()}
    steering = {f"{v}_calibrated": study.steering[v] for v in variants.values() if v in study.steering}
    return dataclasses.replace(
        study, name=name or f"{study.name}_calibrated", variants=configs, steering=steering
    ), thresholds


def calibrated(study: Study, pipe, *, store, model: str, revision=None, variant=None, progress: bool = True) -> Study:
    """``study`` fitted to the model with its calibrated thresholds resolved (the source's plain SD generated into the
    store first where it is missing): what a caller of :func:`anelab.runs.run_sweep` passes for a study with a
    ``calibrate`` section (any other study comes back as it is)."""
    if not study.calibrate or "thresholds" in study.calibrate:
        return study
    study, _ = resolve_calibration(
        fit_study(study, pipe), pipe, store=store, model=model, revision=revision, variant=variant, progress=progress
    )
    note(
        f"{study.name}: thresholds calibrated from {study.calibrate['from']}'s plain-SD statistics: "
        + "; ".join(f"{v} {t}" for v, t in study.calibrate["thresholds"].items())
    )
    return study


def resolve_calibration(
    study: Study,
    pipe,
    *,
    store,
    model: str | None = None,
    context=None,
    run_missing: bool = True,
    revision=None,
    variant=None,
    progress: bool = True,
) -> tuple[Study, dict[str, dict[int, float]]]:
    """``study`` with the thresholds its ``calibrate`` section asks for, from the store's plain-SD statistics of the
    source study at the same scale. Missing source images are generated first (``run_missing``; cooperatively with
    other processes through the store's locks), or the call fails (planning). Returns the study and the thresholds."""

    spec = study.calibrate
    if not spec:
        return study, {}
    source = load_study(source_path(spec["from"], study.source), scale=study.scale, **study.overrides)
    source = fit_study(
        source, pipe if pipe is not None else context.arch
    )  # the source on this model, as its own sweep runs it
    if spec["variant"] not in source.variants:
        raise AnelabError(
            f"study {study.name!r} calibrates from variant {spec['variant']!r}, which {source.name!r} does not have"
        )
    source = dataclasses.replace(
        source,
        variants={spec["variant"]: source.variants[spec["variant"]]},
        steering={k: v for k, v in source.steering.items() if k == spec["variant"]},
    )
    needed = {study.variants[v].attention_res for v in spec["variants"]}
    recorded = set(source.record.resolutions or ()) if source.record else set()
    if source.record is None or (source.record.resolutions is not None and not needed <= recorded):
        raise AnelabError(
            f"study {source.name!r} does not record resolution(s) {sorted(needed - recorded)} that {study.name!r} calibrates at"
        )
    keys = (
        [k for job in prepare(source, pipe, model, revision=revision, variant=variant) for k in job.keys]
        if pipe is not None
        else context.keys(source)
    )
    rows = store.latest_rows(keys, columns=["recorded"])
    if len(rows) < len(set(keys)):
        if not run_missing:
            raise AnelabError(f"the plain-SD statistics of {source.name!r} are not in the store yet")
        run_sweep(source, pipe, None, model=model, store=store, progress=progress, revision=revision, variant=variant)
        rows = store.latest_rows(keys, columns=["recorded"])
    import pyarrow.compute as pc

    stats = store.entries("stats", rows, filter=pc.field("res").isin(sorted(needed)))
    thresholds = {
        v: calibrate_thresholds(
            stats, study.variants[v].attention_res, list(study.variants[v].thresholds), spec["quantile"]
        )
        for v in spec["variants"]
    }
    variants = {k: c.replace(thresholds=thresholds[k]) if k in thresholds else c for k, c in study.variants.items()}
    return dataclasses.replace(
        study,
        variants=variants,
        calibrate={
            **spec,
            "thresholds": {k: {int(s): round(t, 6) for s, t in v.items()} for k, v in thresholds.items()},
        },
    ), thresholds
