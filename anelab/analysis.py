"""Tidy frames for the studies: subject-token extremes and their quantile trends over images.

Input is token statistics as :meth:`AttentionCache.stats` gives them (one row per image, step,
resolution and token), possibly concatenated over prompts and runs (a ``run`` column, or any
other columns named in ``by``). An *image* is a (prompt, seed) pair.
"""

from __future__ import annotations

from collections.abc import Sequence

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
