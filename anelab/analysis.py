"""Tidy frames for the studies: subject-token extremes and their quantile trends over images.

Input is token statistics as :meth:`AttentionCache.stats` gives them (one row per image, step,
resolution and token), possibly concatenated over prompts and runs (a ``run`` column, or any
other columns named in ``by``). An *image* is a (prompt, seed) pair.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .errors import AnelabError

DEFAULT_QUANTILES = (0.05, 0.1, 0.3, 0.5)
IMAGE_KEYS = ("prompt", "seed")


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise AnelabError(f"{what} needs columns {missing}; got {list(frame.columns)}")


def subject_extremes(stats: pd.DataFrame, value: str = "max_attention", by: Sequence[str] = ()) -> pd.DataFrame:
    """Per image, step and resolution: the ``value`` of the higher- and the lower-attended subject token.

    Returns columns ``[*by, prompt, seed, step, timestep, res, higher, lower]`` (STUDIES.md 02, attention trends).
    """
    keys = [*by, *IMAGE_KEYS, "step", "timestep", "res"]
    _require(stats, [*keys, "subject", value], "subject_extremes")
    subjects = stats[stats.subject]
    if subjects.empty:
        raise AnelabError("no subject tokens in these statistics (record a run with tokens=[...] and Record(tokens='subjects' or 'prompt'))")
    grouped = subjects.groupby(keys, sort=True)[value]
    return pd.DataFrame({"higher": grouped.max(), "lower": grouped.min()}).reset_index()


def quantile_trends(
    stats: pd.DataFrame, quantiles: Sequence[float] = DEFAULT_QUANTILES, value: str = "max_attention", by: Sequence[str] = ()
) -> pd.DataFrame:
    """Quantiles over images of the higher/lower subject's ``value``, per step and resolution.

    Long form: ``[*by, step, timestep, res, token_rank ("higher"/"lower"), quantile, value, images]``.
    """
    if not quantiles or any(not 0 <= q <= 1 for q in quantiles):
        raise AnelabError(f"quantiles must be numbers in [0, 1], got {list(quantiles)!r}")
    extremes = subject_extremes(stats, value, by)
    long = extremes.melt(id_vars=[*by, *IMAGE_KEYS, "step", "timestep", "res"], value_vars=["higher", "lower"], var_name="token_rank")
    keys = [*by, "step", "timestep", "res", "token_rank"]
    grouped = long.groupby(keys, sort=True)["value"]
    trends = grouped.quantile(list(quantiles)).rename_axis([*keys, "quantile"]).rename("value").reset_index()
    return trends.merge(grouped.size().rename("images").reset_index(), on=keys)


def summarize(
    frame: pd.DataFrame, measures: Sequence[str], by: str = "category", groups: Sequence[str] = (), overall: str = "overall"
) -> pd.DataFrame:
    """Mean, std and 95% confidence interval (Student t) over rows (images) of each measure,
    per ``by`` value and over all (``by == "overall"``), within each ``groups`` combination.

    Long form: ``[*groups, by, measure, n, mean, std, ci_low, ci_high]`` — the table the notebooks plot.
    """
    from scipy import stats as st

    _require(frame, [*groups, by, *measures], "summarize")
    long = frame.melt(id_vars=[*groups, by], value_vars=list(measures), var_name="measure").dropna(subset=["value"])
    everything = long.assign(**{by: overall})
    keys = [*groups, by, "measure"]
    grouped = pd.concat([long, everything], ignore_index=True).groupby(keys, sort=False)["value"]
    table = grouped.agg(n="count", mean="mean", std="std").reset_index()
    half = st.t.ppf(0.975, (table.n - 1).clip(lower=1)) * table["std"] / np.sqrt(table.n)
    half[table.n < 2] = np.nan
    return table.assign(ci_low=table["mean"] - half, ci_high=table["mean"] + half)


def wide_summary(summary: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """:func:`summarize`'s long table for reading: one row per category, one column per
    (measure, variant), cells ``mean [ci_low, ci_high]``."""
    _require(summary, ["variant", "category", "measure", "mean", "ci_low", "ci_high"], "wide_summary")

    def cell(row) -> str:
        interval = "" if pd.isna(row.ci_low) else f" [{row.ci_low:.{digits}f}, {row.ci_high:.{digits}f}]"
        return f"{row['mean']:.{digits}f}{interval}"

    table = summary.assign(cell=summary.apply(cell, axis=1))
    wide = table.pivot(index="category", columns=["measure", "variant"], values="cell")
    order = [(m, v) for m in dict.fromkeys(summary.measure) for v in dict.fromkeys(summary.variant)]
    return wide.reindex(index=list(dict.fromkeys(summary.category)), columns=[c for c in order if c in wide.columns])


def step_table(rates: pd.DataFrame) -> pd.DataFrame:
    """:func:`anelab.metrics.guidance_stats` for reading: indexed by its grouping columns and the
    threshold step, the over-all-steps row labelled ``all``."""
    keys = [c for c in rates.columns if c not in ("step", "pairs", "triggered", "guidance_rate", "success_rate", "mean_refinement_rounds")]
    frame = rates.assign(_all=rates.step.isna(), step=["all" if pd.isna(s) else str(int(s)) for s in rates.step])
    if keys:  # each group's steps, then its "all" row; groups in order of first appearance
        rank = {key: i for i, key in enumerate(dict.fromkeys(frame[keys].itertuples(index=False)))}
        frame = frame.assign(_group=[rank[k] for k in frame[keys].itertuples(index=False)])
        frame = frame.sort_values(["_group", "_all"], kind="stable").drop(columns="_group")
    return frame.drop(columns="_all").set_index([*keys, "step"])


def calibrate_thresholds(
    stats: pd.DataFrame, resolution: int, steps: Sequence[int] = (0, 10, 20), quantile: float = 0.5, token_rank: str = "lower"
) -> dict[int, float]:
    """Refinement thresholds ``{step: value}`` for guidance at ``resolution``, taken from plain-SD statistics:
    the ``quantile`` over images of the ``token_rank`` ("lower"/"higher") subject's smoothed max attention
    at each step (STUDIES.md 02, calibrated thresholds). The 16-resolution defaults assume what 16x16
    maps reach; this asks each resolution for what it actually reaches."""
    if not 0 <= quantile <= 1:
        raise AnelabError(f"quantile must lie in [0, 1], got {quantile!r}")
    if token_rank not in ("lower", "higher"):
        raise AnelabError(f"token_rank must be 'lower' or 'higher', got {token_rank!r}")
    at_res = stats[stats.res == resolution] if "res" in stats.columns else stats.iloc[:0]
    if at_res.empty:
        available = sorted(stats.res.unique()) if "res" in stats.columns else []
        raise AnelabError(f"no statistics at resolution {resolution}; these have {available}")
    extremes = subject_extremes(at_res)
    missing = [s for s in steps if s not in set(extremes.step)]
    if missing:
        raise AnelabError(f"no statistics at step(s) {missing}; recorded steps are {sorted(set(extremes.step))[:10]}...")
    return {int(s): float(np.quantile(extremes.loc[extremes.step == s, token_rank], quantile)) for s in steps}


def calibration_stats(
    pipe, prompts: pd.DataFrame | Sequence[tuple[str, Sequence[str]]], seeds: Sequence[int] = range(4),
    resolutions: Sequence[int] | None = None, num_inference_steps: int = 50, size: int | None = None, progress: bool = True,
) -> pd.DataFrame:  # fmt: skip
    """Run the plain-SD pass that :func:`calibrate_thresholds` needs: token statistics (no maps) of every
    prompt (``prompt, tokens`` rows or pairs) and seed at ``resolutions``."""
    from tqdm.auto import tqdm

    from .pipeline import generate
    from .recording import Record

    pairs = list(zip(prompts.prompt, prompts.tokens)) if isinstance(prompts, pd.DataFrame) else list(prompts)
    if not pairs:
        raise AnelabError("calibration needs at least one (prompt, tokens) pair")
    record = Record(resolutions=resolutions, maps=False)
    frames = []
    for prompt, tokens in tqdm(pairs, desc="calibration (plain SD)", disable=not progress):
        out = generate(pipe, prompt, list(tokens), seeds=list(seeds), num_inference_steps=num_inference_steps,
                       height=size, width=size, output_type="latent", record=record, progress=False)  # fmt: skip
        frames.append(out.attention.stats())
    return pd.concat(frames, ignore_index=True)


def cross_resolution_effect(stats: pd.DataFrame, baseline: str = "sd", steps: Sequence[int] | None = None) -> pd.DataFrame:
    """Mean smoothed max attention of the lower-attended subject per variant (rows) and resolution (columns),
    minus the ``baseline`` variant's: how guiding at one resolution moves attention at the others (STUDIES.md 02)."""
    _require(stats, ["variant"], "cross_resolution_effect")
    frame = stats if steps is None else stats[stats.step.isin(list(steps))]
    extremes = subject_extremes(frame, by=["variant"])
    table = extremes.groupby(["variant", "res"]).lower.mean().unstack("res")
    if baseline not in table.index:
        raise AnelabError(f"baseline variant {baseline!r} is not in these statistics ({list(table.index)})")
    order = list(dict.fromkeys(stats.variant))
    return (table - table.loc[baseline]).reindex([v for v in order if v in table.index])


def steered_subject(stats: pd.DataFrame, results: pd.DataFrame, subject: int, steps: Sequence[int] | None = None) -> pd.DataFrame:
    """Per image (variant, prompt, seed): statistics of the prompt's ``subject``-th subject token at the
    recorded resolution, averaged over ``steps`` (default all recorded): max_attention, centroid_x/y."""
    _require(results, ["variant", "prompt", "seed", "tokens"], "steered_subject")
    words = {p: t.split(",")[subject] for p, t in zip(results.prompt, results.tokens)}
    frame = stats if steps is None else stats[stats.step.isin(list(steps))]
    frame = frame[frame.token == frame.prompt.map(words)]
    return frame.groupby(["variant", "prompt", "seed"], sort=False)[["max_attention", "centroid_x", "centroid_y"]].mean().reset_index()


#: The image–text measures the notebooks report (STUDIES.md, measures).
SIMILARITY_MEASURES = ("full_prompt", "min_object", "text_text")
_SUB_PROMPT = {0: "first_half", 1: "second_half"}


def variant_table(results: pd.DataFrame, trace: pd.DataFrame, measures: Sequence[str] = SIMILARITY_MEASURES) -> pd.DataFrame:
    """One row per variant (in the sweep's order): guidance rate, success rate and mean refinement rounds
    over all threshold steps, seconds per image, and the mean of each measure over all images
    (STUDIES.md 03 and 04: efficiency against similarity). Plain SD has no guidance statistics (NaN)."""
    from .metrics import guidance_stats

    _require(results, ["variant", "seconds", *measures], "variant_table")
    gs = guidance_stats(trace, by=["variant"])
    efficiency = gs[gs.step.isna()].set_index("variant")[["guidance_rate", "success_rate", "mean_refinement_rounds"]]
    overall = summarize(results, measures, by="category", groups=["variant"]).query("category == 'overall'")
    similarity = overall.pivot(index="variant", columns="measure", values="mean").reindex(columns=list(measures))
    seconds = results.groupby("variant").seconds.mean().rename("seconds_per_image")
    return pd.concat([efficiency, seconds, similarity], axis=1).reindex(list(dict.fromkeys(results.variant)))


def suppression_table(steered: pd.DataFrame, results: pd.DataFrame, subject: int, bound: float) -> pd.DataFrame:
    """Per variant, for the suppressed ``subject`` (rows of :func:`steered_subject`): mean smoothed max
    attention, share of images at or under ``bound``, and mean CLIP similarity to that subject's
    sub-prompt (STUDIES.md 05: does the subject disappear, and how often)."""
    if subject not in _SUB_PROMPT:
        raise AnelabError(f"subject must be 0 (first) or 1 (second), got {subject!r}")
    _require(results, ["variant", _SUB_PROMPT[subject]], "suppression_table")
    table = steered.groupby("variant", sort=False).max_attention.agg(
        mean_attention="mean", share_under_bound=lambda a: float((a <= bound).mean())
    )
    column = _SUB_PROMPT[subject]
    table[f"{column}_similarity"] = results.groupby("variant")[column].mean()
    return table


def layout_table(steered: pd.DataFrame, targets: dict[str, Sequence[float]], reference: str = "ae") -> pd.DataFrame:
    """For each steered variant and its target point (x right, y down): mean centroid and mean distance
    to the target, of the ``reference`` run and of the steered run (rows of :func:`steered_subject`;
    STUDIES.md 05: does the subject move there)."""
    variants = set(steered.variant)
    missing = [v for v in [reference, *targets] if v not in variants]
    if missing:
        raise AnelabError(f"variant(s) {missing} are not in these statistics ({sorted(variants)})")
    rows = []
    for name, (tx, ty) in targets.items():
        for run, variant in (("reference", reference), ("steered", name)):
            part = steered[steered.variant == variant]
            distance = np.hypot(part.centroid_x - tx, part.centroid_y - ty)
            rows.append({"target": name, "target_x": tx, "target_y": ty, "run": run, "variant": variant,
                         "centroid_x": part.centroid_x.mean(), "centroid_y": part.centroid_y.mean(), "distance": distance.mean()})  # fmt: skip
    return pd.DataFrame(rows)


def calibrated_study(study, sd_stats: pd.DataFrame, variants: dict[int, str], quantile: float = 0.5):
    """A copy of ``study`` holding, for each ``{resolution: variant}``, that variant with thresholds
    calibrated from ``sd_stats`` at its own threshold steps (:func:`calibrate_thresholds`), named
    ``<variant>_calibrated`` (plain SD is left out: the study's own SD run is the baseline).
    Returns ``(study, {resolution: thresholds})`` (STUDIES.md 02)."""
    import dataclasses

    unknown = [v for v in variants.values() if study.variants.get(v) is None]
    if unknown:
        raise AnelabError(f"variant(s) {unknown} are not guided variants of study {study.name!r}")
    thresholds = {
        res: calibrate_thresholds(sd_stats, res, list(study.variants[name].thresholds), quantile) for res, name in variants.items()
    }
    configs = {f"{name}_calibrated": study.variants[name].replace(thresholds=thresholds[res]) for res, name in variants.items()}
    return dataclasses.replace(study, name=f"{study.name}_calibrated", variants=configs), thresholds
