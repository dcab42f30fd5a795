"""Tidy frames for the studies, computed from results tables only (this module never runs a model).

Attention: subject-token extremes and their quantile trends over images, from token statistics as
:meth:`AttentionCache.stats` gives them (one row per image, step, resolution and token, possibly
concatenated over prompts and runs: a ``run`` column, or any other columns named in ``by``); an *image*
is a (prompt, seed) pair. Guidance: rate, success and rounds from traces (the one rule, :func:`guidance_pairs`).
Comparisons: summaries with confidence intervals, paired differences against plain SD (the seeds are
shared), and the published figures side by side (``data/published.json``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from .errors import AnelabError
from .resources import data_file

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
        raise AnelabError(
            "no subject tokens in these statistics (record a run with tokens=[...] and Record(tokens='subjects' or 'prompt'))"
        )
    grouped = subjects.groupby(keys, sort=True)[value]
    return pd.DataFrame({"higher": grouped.max(), "lower": grouped.min()}).reset_index()


def quantile_trends(
    stats: pd.DataFrame,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    value: str = "max_attention",
    by: Sequence[str] = (),
) -> pd.DataFrame:
    """Quantiles over images of the higher/lower subject's ``value``, per step and resolution.

    Long form: ``[*by, step, timestep, res, token_rank ("higher"/"lower"), quantile, value, images]``.
    """
    if not quantiles or any(not 0 <= q <= 1 for q in quantiles):
        raise AnelabError(f"quantiles must be numbers in [0, 1], got {list(quantiles)!r}")
    extremes = subject_extremes(stats, value, by)
    long = extremes.melt(
        id_vars=[*by, *IMAGE_KEYS, "step", "timestep", "res"], value_vars=["higher", "lower"], var_name="token_rank"
    )
    keys = [*by, "step", "timestep", "res", "token_rank"]
    grouped = long.groupby(keys, sort=True)["value"]
    trends = grouped.quantile(list(quantiles)).rename_axis([*keys, "quantile"]).rename("value").reset_index()
    return trends.merge(grouped.size().rename("images").reset_index(), on=keys)


def summarize(
    frame: pd.DataFrame,
    measures: Sequence[str],
    by: str = "category",
    groups: Sequence[str] = (),
    overall: str = "overall",
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
    keys = [c for c in rates.columns if c not in ("step", *GUIDANCE_COLUMNS, *INTERVAL_COLUMNS)]
    frame = rates.assign(_all=rates.step.isna(), step=["all" if pd.isna(s) else str(int(s)) for s in rates.step])
    if keys:  # each group's steps, then its "all" row; groups in order of first appearance
        rank = {key: i for i, key in enumerate(dict.fromkeys(frame[keys].itertuples(index=False)))}
        frame = frame.assign(_group=[rank[k] for k in frame[keys].itertuples(index=False)])
        frame = frame.sort_values(["_group", "_all"], kind="stable").drop(columns="_group")
    return frame.drop(columns="_all").set_index([*keys, "step"])


def calibrate_thresholds(
    stats: pd.DataFrame,
    resolution: int,
    steps: Sequence[int] = (0, 10, 20),
    quantile: float = 0.5,
    token_rank: str = "lower",
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
        raise AnelabError(
            f"no statistics at step(s) {missing}; recorded steps are {sorted(set(extremes.step))[:10]}..."
        )
    return {int(s): float(np.quantile(extremes.loc[extremes.step == s, token_rank], quantile)) for s in steps}


def cross_resolution_effect(
    stats: pd.DataFrame, baseline: str = "sd", steps: Sequence[int] | None = None
) -> pd.DataFrame:
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


def cross_resolution_by_step(stats: pd.DataFrame, baseline: str = "sd") -> pd.DataFrame:
    """Per guided variant, recorded resolution and step: the lower subject's mean smoothed max minus the
    ``baseline``'s at the same step and resolution — the cross-resolution effect as curves (STUDIES.md 02).
    Long form ``[variant, res, step, difference]``."""
    _require(stats, ["variant"], "cross_resolution_by_step")
    extremes = subject_extremes(stats, by=["variant"])
    means = extremes.groupby(["variant", "res", "step"]).lower.mean()
    if baseline not in means.index.get_level_values("variant"):
        raise AnelabError(f"baseline variant {baseline!r} is not in these statistics")
    base = means.xs(baseline, level="variant")
    rows = [(v, r, s, value - base.get((r, s), np.nan)) for (v, r, s), value in means.items() if v != baseline]
    order = {v: k for k, v in enumerate(dict.fromkeys(stats.variant))}
    table = pd.DataFrame(rows, columns=["variant", "res", "step", "difference"])
    return table.sort_values(
        ["variant", "res", "step"], key=lambda c: c.map(order) if c.name == "variant" else c, ignore_index=True
    )


def steered_subject(
    stats: pd.DataFrame, results: pd.DataFrame, subject: int, steps: Sequence[int] | None = None
) -> pd.DataFrame:
    """Per image (variant, prompt, seed): statistics of the prompt's ``subject``-th subject token at the
    recorded resolution, averaged over ``steps`` (default all recorded): max_attention, centroid_x/y."""
    _require(results, ["variant", "prompt", "seed", "tokens"], "steered_subject")
    words = {p: t.split(",")[subject] for p, t in zip(results.prompt, results.tokens)}
    frame = stats if steps is None else stats[stats.step.isin(list(steps))]
    frame = frame[frame.token == frame.prompt.map(words)]
    return (
        frame.groupby(["variant", "prompt", "seed"], sort=False)[["max_attention", "centroid_x", "centroid_y"]]
        .mean()
        .reset_index()
    )


#: The image–text measures the notebooks report (STUDIES.md, measures).
SIMILARITY_MEASURES = ("full_prompt", "min_object", "text_text")
_SUB_PROMPT = {0: "first_half", 1: "second_half"}


GUIDANCE_COLUMNS = ["pairs", "triggered", "guidance_rate", "success_rate", "mean_refinement_rounds"]
INTERVAL_COLUMNS = ["succeeded", "guidance_rate_low", "guidance_rate_high", "success_rate_low", "success_rate_high"]


def rate_interval(k, n, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """Wilson 95% interval of a share ``k / n`` (arrays); NaN where ``n`` is 0."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    return np.where(n > 0, centre - half, np.nan), np.where(n > 0, centre + half, np.nan)


def guidance_pairs(trace: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """The (image, refinement step) pairs of a trace — what every guidance statistic counts (STUDIES.md):
    ``triggered`` (refinement was needed), ``succeeded`` (triggered and the threshold then held) and
    ``refinement_iterations``. A refinement step is a threshold step, or a step that refined without a threshold
    (CONFORM: ``thresholded`` False, its success undefined). An image is a seed (with ``key``/``variant``/``prompt``
    when the trace has them)."""
    needed = ["seed", "step", "threshold", "triggered", "reached", "refinement_iterations", *by]
    missing = [c for c in needed if c not in trace.columns]
    if missing:
        raise AnelabError(f"guidance statistics need trace columns {missing}")
    image = [c for c in ("key", "variant", "prompt") if c in trace.columns and c not in by] + ["seed"]
    pairs = trace[trace.threshold.notna() | trace.triggered.astype(bool)].drop_duplicates([*by, *image, "step"])
    triggered = pairs.triggered.astype(bool)
    return pairs[[*by, *image, "step", "refinement_iterations"]].assign(
        triggered=triggered,
        succeeded=triggered & pairs.reached.fillna(False).astype(bool),
        thresholded=pairs.threshold.notna(),
    )


def guidance_stats(trace: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """Guidance rate, success rate and mean refinement rounds (STUDIES.md) per threshold step and overall.

    Over the pairs of :func:`guidance_pairs`: rate = share of pairs that triggered refinement; success =
    share of triggered pairs that reached the threshold; rounds = refinement iterations per pair
    (untriggered count 0); each share with its Wilson 95% interval and its n (``pairs``, ``triggered``).
    Rows with ``step`` <NA> are over all threshold steps; ``by`` adds grouping columns (e.g. category).
    """
    pairs = guidance_pairs(trace, by)

    def summary(group: pd.DataFrame) -> pd.Series:
        triggered = group.triggered
        reached = group.succeeded[triggered & group.thresholded]  # a refinement without a threshold reaches nothing
        return pd.Series(
            {
                "pairs": len(group),
                "triggered": int(triggered.sum()),
                "guidance_rate": triggered.mean() if len(group) else np.nan,
                "success_rate": reached.mean() if len(reached) else np.nan,
                "mean_refinement_rounds": group.refinement_iterations.mean() if len(group) else np.nan,
            }
        )

    per_step = (
        pairs.groupby([*by, "step"], sort=False).apply(summary, include_groups=False).reset_index()
        if len(pairs)
        else None
    )
    if per_step is not None:  # groups in order of first appearance (a study's variant order), steps ascending
        per_step = per_step.sort_values("step", kind="stable")
        if by:
            rank = {k: i for i, k in enumerate(dict.fromkeys(pairs[list(by)].itertuples(index=False, name=None)))}
            per_step = per_step.iloc[
                np.argsort([rank[k] for k in per_step[list(by)].itertuples(index=False, name=None)], kind="stable")
            ]
    if by:
        overall = (
            pairs.groupby(list(by), sort=False).apply(summary, include_groups=False).reset_index()
            if len(pairs)
            else None
        )
    else:
        overall = summary(pairs).to_frame().T
    frames = [f for f in (per_step, overall) if f is not None]
    result = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*by, "step", *GUIDANCE_COLUMNS])
    result["step"] = (
        result["step"].astype("Int64") if "step" in result else pd.array([pd.NA] * len(result), dtype="Int64")
    )
    result = result.astype(
        {"pairs": int, "triggered": int, "guidance_rate": float, "success_rate": float, "mean_refinement_rounds": float}
    )
    result["succeeded"] = (result.success_rate.fillna(0) * result.triggered).round().astype(int)
    result["guidance_rate_low"], result["guidance_rate_high"] = rate_interval(result.triggered, result.pairs)
    result["success_rate_low"], result["success_rate_high"] = rate_interval(result.succeeded, result.triggered)
    return result[[*by, "step", *GUIDANCE_COLUMNS, *INTERVAL_COLUMNS]]


def variant_table(
    results: pd.DataFrame, trace: pd.DataFrame, measures: Sequence[str] = SIMILARITY_MEASURES
) -> pd.DataFrame:
    """One row per variant (in the sweep's order): guidance rate, success rate and mean refinement rounds
    over all threshold steps, seconds per image, and the mean of each measure over all images
    (STUDIES.md 03 and 04: efficiency against similarity). Plain SD has no guidance statistics (NaN)."""
    _require(results, ["variant", "seconds", *measures], "variant_table")
    gs = guidance_stats(trace, by=["variant"])
    efficiency = gs[gs.step.isna()].set_index("variant")[["guidance_rate", "success_rate", "mean_refinement_rounds"]]
    overall = summarize(results, measures, by="category", groups=["variant"]).query("category == 'overall'")
    similarity = overall.pivot(index="variant", columns="measure", values="mean").reindex(columns=list(measures))
    seconds = results.groupby("variant").seconds.mean().rename("seconds_per_image")
    return pd.concat([efficiency, seconds, similarity], axis=1).reindex(list(dict.fromkeys(results.variant)))


def suppression_table(steered: pd.DataFrame, results: pd.DataFrame, subject: int, bound: float) -> pd.DataFrame:
    """Per variant, for the suppressed ``subject`` (rows of :func:`steered_subject`): mean smoothed max
    attention, share of images at or under ``bound``, mean CLIP similarity to that subject's sub-prompt and,
    when the results carry detections, the *suppression success*: the share of images where the detector
    finds the suppressed subject absent while the other subject is present (STUDIES.md 05), with its n."""
    if subject not in _SUB_PROMPT:
        raise AnelabError(f"subject must be 0 (first) or 1 (second), got {subject!r}")
    _require(results, ["variant", _SUB_PROMPT[subject]], "suppression_table")
    table = steered.groupby("variant", sort=False).max_attention.agg(
        mean_attention="mean", share_under_bound=lambda a: float((a <= bound).mean())
    )
    column = _SUB_PROMPT[subject]
    table[f"{column}_similarity"] = results.groupby("variant")[column].mean()
    other = 1 - subject
    if {f"present_{subject}", f"present_{other}"} <= set(results.columns):
        judged = results.dropna(subset=[f"present_{subject}", f"present_{other}"])
        success = (judged[f"present_{subject}"] == 0) & (judged[f"present_{other}"] == 1)
        table["suppressed_absent_other_present"] = success.groupby(judged.variant).mean()
        table["images_judged"] = judged.groupby("variant").size()
    return table


def layout_table(
    steered: pd.DataFrame,
    targets: dict[str, Sequence[float]],
    reference: str = "ae",
    results: pd.DataFrame | None = None,
    subject: int = 0,
) -> pd.DataFrame:
    """For each steered variant and its target point (x right, y down): mean attention centroid and its mean
    distance to the target, of the ``reference`` run and of the steered run (rows of :func:`steered_subject`),
    and, when ``results`` carry detections, the detected object's mean centre and its distance to the target
    over the images where the ``subject`` was found, with that share (STUDIES.md 05: does the subject move there)."""
    variants = set(steered.variant)
    missing = [v for v in [reference, *targets] if v not in variants]
    if missing:
        raise AnelabError(f"variant(s) {missing} are not in these statistics ({sorted(variants)})")
    detected = results is not None and {f"center_x_{subject}", f"center_y_{subject}", f"present_{subject}"} <= set(
        results.columns
    )
    rows = []
    for name, (tx, ty) in targets.items():
        for run, variant in (("reference", reference), ("steered", name)):
            part = steered[steered.variant == variant]
            distance = np.hypot(part.centroid_x - tx, part.centroid_y - ty)
            row = {
                "target": name,
                "target_x": tx,
                "target_y": ty,
                "run": run,
                "variant": variant,
                "centroid_x": part.centroid_x.mean(),
                "centroid_y": part.centroid_y.mean(),
                "distance": distance.mean(),
            }
            if detected:
                images = results[results.variant == variant]
                found = images[images[f"present_{subject}"] == 1]
                row |= {
                    "object_x": found[f"center_x_{subject}"].mean(),
                    "object_y": found[f"center_y_{subject}"].mean(),
                    "object_distance": np.hypot(
                        found[f"center_x_{subject}"] - tx, found[f"center_y_{subject}"] - ty
                    ).mean(),
                    "object_found": len(found) / len(images) if len(images) else np.nan,
                }
            rows.append(row)
    return pd.DataFrame(rows)


def reading_of_differences(differences: pd.DataFrame, baseline: str = "plain SD", by: str = "category") -> str:
    """A 'Reading' paragraph computed from :func:`paired_differences`: per variant and measure over all
    images, whether the difference is resolved (its 95% interval excludes 0) and its direction, and the
    categories where it is."""
    lines = []
    overall = differences[differences[by] == "overall"]
    for row in overall.itertuples():
        if pd.isna(row.difference):
            continue
        if row.ci_low > 0 or row.ci_high < 0:
            said = f"**{'higher' if row.difference > 0 else 'lower'}** than {baseline}"
        else:
            said = f"not resolved from {baseline} at n = {row.n} (the interval includes 0)"
        parts = differences[
            (differences.variant == row.variant) & (differences.measure == row.measure) & (differences[by] != "overall")
        ]
        resolved = [str(p) for p, lo, hi in zip(parts[by], parts.ci_low, parts.ci_high) if lo > 0 or hi < 0]
        where = f"; resolved in {', '.join(resolved)}" if resolved else ""
        lines.append(
            f"- {row.variant}, {row.measure}: {row.difference:+.4f} [{row.ci_low:+.4f}, {row.ci_high:+.4f}] "
            f"({row.relative:+.1%}) — {said}{where}."
        )
    return "\n".join(lines) or "- no paired images to compare."


def paired_differences(
    results: pd.DataFrame, measures: Sequence[str], baseline: str = "sd", by: str = "category"
) -> pd.DataFrame:
    """Each variant minus ``baseline`` on the same (prompt, seed) — the seeds are shared, so the difference is
    paired: per ``by`` value and overall, the mean difference with its 95% CI (Student t over pairs), the
    baseline's mean and the relative change. Long form: ``[variant, by, measure, n, difference, ci_low,
    ci_high, baseline_mean, relative]``."""
    from scipy import stats as st

    _require(results, ["variant", "prompt", "seed", by, *measures], "paired_differences")
    if baseline not in set(results.variant):
        raise AnelabError(f"baseline variant {baseline!r} is not in these results ({sorted(set(results.variant))})")
    keys = ["prompt", "seed"]
    base = results[results.variant == baseline].drop_duplicates(keys).set_index(keys)
    rows = []
    for variant in [v for v in dict.fromkeys(results.variant) if v != baseline]:
        mine = results[results.variant == variant].drop_duplicates(keys).set_index(keys)
        shared = mine.index.intersection(base.index)
        for measure in measures:
            difference = (mine.loc[shared, measure] - base.loc[shared, measure]).rename("d").to_frame()
            difference["base"] = base.loc[shared, measure]
            difference[by] = mine.loc[shared, by]
            difference = difference.dropna(subset=["d"])
            for group, part in [*difference.groupby(by, sort=False), ("overall", difference)]:
                n = len(part)
                half = st.t.ppf(0.975, n - 1) * part.d.std() / np.sqrt(n) if n > 1 else np.nan
                mean, base_mean = part.d.mean() if n else np.nan, part.base.mean() if n else np.nan
                rows.append(
                    {
                        "variant": variant,
                        by: group,
                        "measure": measure,
                        "n": n,
                        "difference": mean,
                        "ci_low": mean - half,
                        "ci_high": mean + half,
                        "baseline_mean": base_mean,
                        "relative": mean / abs(base_mean) if base_mean else np.nan,
                    }
                )
    return pd.DataFrame(
        rows, columns=["variant", by, "measure", "n", "difference", "ci_low", "ci_high", "baseline_mean", "relative"]
    )


def difference_table(differences: pd.DataFrame, digits: int = 3, by: str = "category") -> pd.DataFrame:
    """:func:`paired_differences` for reading: rows (variant, ``by``), one column per measure,
    cells ``+0.012 [−0.003, +0.027] (+1.5%)``."""

    def cell(row) -> str:
        if pd.isna(row.difference):
            return "—"
        interval = "" if pd.isna(row.ci_low) else f" [{row.ci_low:+.{digits}f}, {row.ci_high:+.{digits}f}]"
        relative = "" if pd.isna(row.relative) else f" ({row.relative:+.1%})"
        return f"{row.difference:+.{digits}f}{interval}{relative}"

    table = differences.assign(cell=differences.apply(cell, axis=1))
    wide = table.pivot(index=["variant", by], columns="measure", values="cell")
    order = list(dict.fromkeys(zip(differences.variant, differences[by])))
    return wide.reindex(pd.MultiIndex.from_tuples(order, names=["variant", by]))[
        list(dict.fromkeys(differences.measure))
    ]


def seconds_table(results: pd.DataFrame) -> pd.DataFrame:
    """Seconds per image per variant: over all images, and split by whether refinement ran in the image's
    generate call (the paper reports 5.6 s SD, 9.7 s A&E, 15.4 s with refinement on an A100, batch 1).
    A generate call makes a batch of seeds; its seconds are shared by its images."""
    _require(results, ["variant", "seconds", "refinement_rounds"], "seconds_table")
    refined = results.refinement_rounds > 0
    table = pd.DataFrame(
        {
            "images": results.groupby("variant", sort=False).size(),
            "seconds_per_image": results.groupby("variant", sort=False).seconds.mean(),
            "without_refinement": results[~refined].groupby("variant", sort=False).seconds.mean(),
            "images_without": results[~refined].groupby("variant", sort=False).size(),
            "with_refinement": results[refined].groupby("variant", sort=False).seconds.mean(),
            "images_with": results[refined].groupby("variant", sort=False).size(),
        }
    )
    return table.fillna({"images_without": 0, "images_with": 0}).astype({"images_without": int, "images_with": int})


def ordering(values: pd.Series) -> str:
    """``"res16 > res8 > sd"``: the index of ``values`` from the highest to the lowest (NaN left out)."""
    return " > ".join(map(str, values.dropna().sort_values(ascending=False).index))


def published(notebook: str | None = None) -> pd.DataFrame:
    """The published figures (``data/published.json``) with their sources, optionally of one notebook."""
    import json

    data = json.loads(data_file("published.json").read_text())
    table = pd.DataFrame(data["values"]).assign(source_text=lambda t: t.source.map(data["sources"]))
    return table if notebook is None else table[table.notebook == notebook].reset_index(drop=True)


def searched(notebook: str) -> pd.DataFrame:
    """Where the published figures of a notebook's methods were looked for, and what was found (``data/published.json``,
    section ``searched``): a figure that could not be read and cited says "not found"."""
    import json

    data = json.loads(data_file("published.json").read_text())
    rows = [r for r in data.get("searched", []) if r["notebook"] == notebook]
    return pd.DataFrame(rows, columns=["notebook", "method", "paper", "status", "where"]).drop(columns="notebook")


def beside_published(measured: pd.DataFrame, notebook: str, tolerance: float = 0.1) -> pd.DataFrame:
    """What a run measured next to the published value of the same (variant, category, measure), with a plain verdict.

    ``measured``: long rows ``variant, category, measure, value`` and optionally ``ci_low, ci_high``. A
    figure agrees when the published value lies inside the 95% interval, or (no interval) within
    ``tolerance`` relative of it. Published rows the run did not measure are kept, marked "not measured"."""
    reference = published(notebook)
    numeric = reference[reference.value.map(lambda v: isinstance(v, (int, float)))]
    table = numeric.merge(measured, on=["variant", "category", "measure"], how="left", suffixes=("_published", ""))
    table = table.rename(columns={"value_published": "published", "value": "measured"})
    for column in ("ci_low", "ci_high"):
        if column not in table:
            table[column] = np.nan

    def verdict(row) -> str:
        if pd.isna(row.measured):
            return "not measured"
        if not pd.isna(row.ci_low):
            inside = row.ci_low <= row.published <= row.ci_high
            return (
                "agrees (inside the 95% CI)"
                if inside
                else ("higher than published" if row.ci_low > row.published else "lower than published")
            )
        close = abs(row.measured - row.published) <= tolerance * abs(row.published)
        return (
            f"agrees (within {tolerance:.0%})"
            if close
            else ("higher than published" if row.measured > row.published else "lower than published")
        )

    table["verdict"] = table.apply(verdict, axis=1)
    columns = ["variant", "category", "measure", "measured", "ci_low", "ci_high", "published", "verdict", "source"]
    return table[[*columns, *(["note"] if "note" in table else [])]]


def variant_resolutions(view: dict) -> dict[str, int]:
    """Guided variant → the attention resolution it read on the study's model (the view's spec, after
    :func:`anelab.runs.study.fit_study`: SDXL's ``res16`` reads 32)."""
    return {
        name: int(config["attention_res"]) for name, config in view["study"]["variants"].items() if config is not None
    }


def attention_profile(
    stats: Mapping[str, pd.DataFrame],
    sizes: Mapping[str, int],
    baseline: str = "sd",
    steps: Sequence[int] | None = None,
) -> pd.DataFrame:
    """Which resolution carries the subjects under plain SD, per model (06, architectures): per model and recorded
    resolution, the mean over images and steps of the lower- and higher-attended subject's smoothed max attention
    (``steps``: only those loop indices), with the image pixels per attention cell (``sizes``: model → image side).
    ``stats``: model → the study's token statistics. Long form ``[model, res, px_per_cell, lower, higher, gap]``."""
    rows = []
    for model, frame in stats.items():
        _require(frame, ["variant"], "attention_profile")
        part = frame[frame.variant == baseline]
        if steps is not None:
            part = part[part.step.isin(list(steps))]
        if part.empty:
            continue
        extremes = subject_extremes(part).groupby("res")[["lower", "higher"]].mean()
        for res, row in extremes.iterrows():
            rows.append(
                {
                    "model": model,
                    "res": int(res),
                    "px_per_cell": sizes[model] / int(res),
                    "lower": row.lower,
                    "higher": row.higher,
                    "gap": row.higher - row.lower,
                }
            )
    return pd.DataFrame(rows, columns=["model", "res", "px_per_cell", "lower", "higher", "gap"])


def architecture_comparison(
    runs: Mapping[str, Mapping], measure: str = "min_object", baseline: str = "sd"
) -> pd.DataFrame:
    """A&E at each resolution against the model's own plain SD, per model (06, architectures): the paired difference
    of ``measure`` over all images with its 95% CI, the guidance rate and success rate over all threshold steps, and
    the image pixels per attention cell. ``runs``: model → ``{"results", "trace", "view"}`` of its study. Long form
    ``[model, variant, res, px_per_cell, n, difference, ci_low, ci_high, guidance_rate, success_rate]``."""
    columns = [
        "model",
        "variant",
        "res",
        "px_per_cell",
        "n",
        "difference",
        "ci_low",
        "ci_high",
        "guidance_rate",
        "success_rate",
    ]
    rows = []
    for model, run in runs.items():
        results, trace, view = run["results"], run["trace"], run["view"]
        resolutions, size = variant_resolutions(view), view["study"]["size"]
        have = measure in results.columns and baseline in set(results.variant)
        differences = (
            paired_differences(results, [measure], baseline)
            if have
            else pd.DataFrame(columns=["variant", "category", "difference"])
        )
        overall = differences[differences.category == "overall"].set_index("variant")
        rates = guidance_stats(trace, by=["variant"]) if len(trace) else pd.DataFrame(columns=["variant", "step"])
        rates = rates[rates.step.isna()].set_index("variant")
        for variant, res in resolutions.items():
            if variant not in set(results.variant):
                continue
            got = overall.loc[variant] if variant in overall.index else None
            rows.append(
                {
                    "model": model,
                    "variant": variant,
                    "res": res,
                    "px_per_cell": size / res,
                    "n": np.nan if got is None else got.n,
                    "difference": np.nan if got is None else got.difference,
                    "ci_low": np.nan if got is None else got.ci_low,
                    "ci_high": np.nan if got is None else got.ci_high,
                    "guidance_rate": rates.guidance_rate.get(variant, np.nan),
                    "success_rate": rates.success_rate.get(variant, np.nan),
                }
            )
    return pd.DataFrame(rows, columns=columns)


def architecture_reading(comparison: pd.DataFrame, profile: pd.DataFrame, measure: str = "min_object") -> str:
    """A 'Reading' of :func:`architecture_comparison` and :func:`attention_profile`, per model: the resolution where plain
    SD's lower subject is most attended, and the resolution whose guidance moves ``measure`` most (with its CI)."""
    lines = []
    for model in dict.fromkeys([*profile.model, *comparison.model]):
        said = []
        mine = profile[profile.model == model].dropna(subset=["lower"])
        if len(mine):
            top = mine.loc[mine.lower.idxmax()]
            said.append(
                f"plain SD attends its lower subject most at resolution {int(top.res)} ({top.px_per_cell:g} px per cell, "
                f"mean smoothed max {top.lower:.3f})"
            )
        guided = comparison[comparison.model == model].dropna(subset=["difference"])
        if len(guided):
            best = guided.loc[guided.difference.idxmax()]
            interval = "" if pd.isna(best.ci_low) else f" [{best.ci_low:+.4f}, {best.ci_high:+.4f}]"
            resolved = (
                ""
                if pd.isna(best.ci_low)
                else (" (resolved)" if best.ci_low > 0 or best.ci_high < 0 else " (within noise)")
            )
            said.append(
                f"A&E raises {measure} most at resolution {int(best.res)} ({best.px_per_cell:g} px per cell): "
                f"{best.difference:+.4f}{interval}{resolved}"
            )
        lines.append(f"- {model}: " + ("; ".join(said) if said else "nothing to compare") + ".")
    return "\n".join(lines)


def method_table(results: pd.DataFrame, trace: pd.DataFrame, view: dict, measures: Sequence[str] = ()) -> pd.DataFrame:
    """One row per variant of a methods study (notebook 07): the method and its paper, images, seconds per image and
    the ratio to plain SD's, refinement (pairs of image and refinement step, the share that refined, iterations per
    pair; a method without refinement: NaN), the initial-noise optimisation's success share (InitNO), and the mean of
    each of ``measures``."""
    from . import methods

    _require(results, ["variant", "seconds"], "method_table")
    specs = view["study"]["variants"]
    sd = results[results.variant == "sd"].seconds.mean() if "sd" in set(results.variant) else np.nan
    stats = guidance_stats(trace, by=["variant"]) if len(trace) else pd.DataFrame(columns=["variant", "step"])
    overall = stats[stats.step.isna()].set_index("variant") if len(stats) else pd.DataFrame()
    rows = []
    for variant, group in results.groupby("variant", sort=False):
        method = methods.from_spec(specs.get(variant))
        refined = overall.loc[variant] if variant in overall.index else None
        rows.append(
            {
                "variant": variant,
                "method": "plain SD" if method is None else method.label,
                "paper": "" if method is None else method.paper,
                "images": len(group),
                "seconds_per_image": group.seconds.mean(),
                "x_sd": group.seconds.mean() / sd if sd == sd and sd > 0 else np.nan,
                "refinement_pairs": np.nan if refined is None else refined.pairs,
                "refined_share": np.nan if refined is None else refined.guidance_rate,
                "iterations_per_pair": np.nan if refined is None else refined.mean_refinement_rounds,
                "noise_success": group.noise_success.astype(float).mean() if "noise_success" in group else np.nan,
                **{m: group[m].mean() for m in measures if m in group},
            }
        )
    return pd.DataFrame(rows).set_index("variant")


def disagreements(results: pd.DataFrame, measure: str, n: int = 3, variants: Sequence[str] | None = None) -> list:
    """The ``n`` (prompt, seed) pairs that every variant (of ``variants``) has where ``measure`` varies most across
    them (the largest max − min): where the methods disagree."""
    _require(results, ["variant", "prompt", "seed", measure], "disagreements")
    chosen = list(variants or dict.fromkeys(results.variant))
    wide = results[results.variant.isin(chosen)].pivot_table(
        index=["prompt", "seed"], columns="variant", values=measure
    )
    wide = wide.reindex(columns=chosen).dropna()
    spread = (wide.max(axis=1) - wide.min(axis=1)).sort_values(ascending=False, kind="stable")
    return list(spread.index[:n])


def block_localisation(frame: pd.DataFrame) -> pd.DataFrame:
    """Which transformer blocks localise a subject (notebook 06): per model and block, plain sampling only, the mean
    over images and recorded steps of the lower- and higher-attended subject's smoothed max attention
    (:func:`anelab.blocks.block_runs`' frame). Columns ``model, block, layer, place, lower, higher``."""
    plain = frame[(frame["variant"] == "sd") & (frame["layer"] != "mean")]
    pairs = subject_extremes(plain, by=["model", "block", "layer", "place"])
    profile = pairs.groupby(["model", "block", "layer", "place"], sort=False)[["lower", "higher"]].mean().reset_index()
    profile["block"] = profile["block"].astype(int)
    order = {name: k for k, name in enumerate(dict.fromkeys(plain["model"]))}  # models as they came
    return profile.sort_values(
        ["model", "block"], key=lambda c: c.map(order) if c.name == "model" else c, ignore_index=True
    )


def transformer_guidance(frame: pd.DataFrame) -> pd.DataFrame:
    """A&E's effect per transformer family (notebook 06): the lower subject's smoothed max attention over every block
    (the recording's ``mean``), averaged over images and steps, plain and guided, and their difference."""
    means = frame[frame["layer"] == "mean"]
    pairs = subject_extremes(means, by=["model", "variant"])
    table = pairs.groupby(["model", "variant"], sort=False)["lower"].mean().unstack("variant")
    table = table.reindex(list(dict.fromkeys(means["model"])))  # models as they came
    table = table.rename(columns={"sd": "plain", "ae": "a_and_e"})
    table["difference"] = table["a_and_e"] - table["plain"]
    return table.reset_index()[["model", "plain", "a_and_e", "difference"]]
