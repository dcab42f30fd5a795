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
