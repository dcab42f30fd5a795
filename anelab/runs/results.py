"""Reading a study back: its view (``OUT/study.json``, ``OUT/keys.parquet``) joined with the store's tables.

One table per study, whatever the number of chunk files behind it; large tables (the token statistics
reach tens of millions of rows at full scale) are read through ``pyarrow.dataset`` with only the
columns and rows asked for (``columns=``, ``filter=`` a ``pyarrow.compute`` expression, e.g.
``pc.field("res") == 16``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd

from ..errors import AnelabError
from .runner import KEYS, NOISE_COLUMNS, VIEW
from .store import Store

ROW_COLUMNS = [
    "variant",
    "prompt",
    "category",
    "seed",
    "tokens",
    "image",
    "seconds",  # wall time of the image's generate call / images in it
    "pairs",
    "triggered",
    "reached",
    "refinement_rounds",  # guidance statistics of the image (0 for plain SD)
    "key",
]
LABELS = ["variant", "category", "key"]
VIEW_COLUMNS = ["variant", "prompt", "category", "seed", "tokens", "key"]  # of OUT/keys.parquet


def load_view(out: str | Path) -> tuple[dict, pd.DataFrame, Store]:
    """A study's view: its description, its keys table and its store."""
    out = Path(out)
    if not (out / VIEW).is_file() or not (out / KEYS).is_file():
        raise AnelabError(f"{out} is not a study directory (no {VIEW}); run `anelab sweep STUDY --out {out}` first")
    try:
        view, keys = json.loads((out / VIEW).read_text()), pd.read_parquet(out / KEYS)
    except Exception as error:  # json / pyarrow errors of a damaged view
        raise AnelabError(
            f"{out} holds a damaged view ({type(error).__name__}); run the study again to rewrite it"
        ) from None
    missing = [k for k in ("store", "study") if not isinstance(view, dict) or k not in view]
    missing += [f"{KEYS} column {c!r}" for c in VIEW_COLUMNS if c not in keys.columns]
    if missing:
        raise AnelabError(f"{out} holds a damaged view (no {', '.join(missing)}); run the study again to rewrite it")
    return view, keys, Store(view["store"])


def load_results(out: str | Path) -> pd.DataFrame:
    """One row per image of the study that the store holds: labels, image path, seconds, guidance counts (a method that
    optimises the initial noise: ``noise_success``, ``noise_fallback``, ``noise_rounds``, ``noise_steps``), and the
    scores of the models the study was scored with (:func:`anelab.runs.score_run`). Sorted by variant (study
    order), prompt and seed."""
    view, keys, store = load_view(out)
    noise = [f"noise_{c}" for c in NOISE_COLUMNS]
    rows = store.latest_rows(
        set(keys.key), columns=["seconds", "pairs", "triggered", "reached", "refinement_rounds", "image_bytes", *noise]
    )
    if rows.empty:
        return pd.DataFrame(columns=ROW_COLUMNS)
    intact = store.intact(rows)
    if not intact.all():
        warnings.warn(
            f"{int((~intact).sum())} image(s) of {out} are missing or damaged in the store and left out; "
            "run the study again to make them",
            stacklevel=2,
        )
        rows = rows[intact]
    table = keys.merge(rows.drop(columns=["write", "written"]), on="key", how="inner")
    table["image"] = [str(store.image(k)) for k in table.key]
    table = table[ROW_COLUMNS + [c for c in noise if c in table and table[c].notna().any()]]
    for kind, model in view.get("scorers", {}).items():
        scores = store.scores(kind, model, set(table.key))
        if len(scores):
            scores = scores.drop(columns=["written"]).rename(columns={"model": f"{kind}_model"})
            table = table.merge(scores, on="key", how="left")
    order = {v: k for k, v in enumerate(view["study"]["variants"])}
    table = table.sort_values(["variant", "prompt", "seed"], key=lambda c: c.map(order) if c.name == "variant" else c)
    return table.reset_index(drop=True)


def _entries(out, kind: str, columns: list[str] | None, filter) -> pd.DataFrame:
    _, keys, store = load_view(out)
    rows = store.latest_rows(set(keys.key), columns=[])
    if rows.empty:
        return pd.DataFrame(columns=[*LABELS, *(columns or [])])
    table = store.entries(kind, rows, None if columns is None else [*columns, "seed"], filter)
    if table.empty:
        return pd.DataFrame(columns=[*LABELS, *(columns or [])])
    labelled = keys[LABELS].merge(table.drop(columns=["write", "written"], errors="ignore"), on="key")
    return labelled if columns is None else labelled[[*LABELS, *[c for c in columns if c not in LABELS]]]


def load_trace(out: str | Path, columns: list[str] | None = None, filter=None) -> pd.DataFrame:
    """The guidance trace of every image of the study (:data:`anelab.trace.TRACE_COLUMNS` + prompt, variant, category, key)."""
    return _entries(out, "trace", columns, filter)


def load_stats(out: str | Path, columns: list[str] | None = None, filter=None) -> pd.DataFrame:
    """Recorded token statistics of every image of the study (:meth:`AttentionCache.stats` + variant, category, key)."""
    return _entries(out, "stats", columns, filter)
