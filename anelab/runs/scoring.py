"""Scoring a study's images into the store: each (image, scorer model) is scored once, whichever study asks.

The scores live in the store (``tables/scores/<scorer>/``) keyed by image key and model, so a second
study over the same images, or a second report, pays nothing; the view records which models the study
was scored with, and :func:`anelab.runs.load_results` joins those.
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm

from ..io import file_digest, file_lock, write_json
from ..log import bars_off
from ..metrics import Scorers, _as_rgb, score_images
from .results import load_view
from .runner import VIEW


def score_run(
    out: str | Path,
    scorers: Scorers,
    *,
    only=None,
    batch_size: int = 16,
    chunk: int = 64,
    progress: bool = True,
) -> dict:
    """Score every image of the study in ``out`` (or ``only`` those keys: a shard's own share, which
    :func:`run_sweep` returns) with every scorer of ``scorers`` that has not scored it yet.

    Returns counts per scorer (``{"clip": {"scored": n, "already": m}, ...}``) and the notices."""
    out = Path(out)
    view, keys, store = load_view(out)
    rows = store.latest_rows(set(keys.key), columns=["prompt", "image_bytes", "image_sha256"])
    rows = rows[store.intact(rows)] if len(rows) else rows  # a missing or cut image is not scored (a sweep remakes it)
    images = keys.drop_duplicates("key").merge(
        rows[["key", "prompt", "image_sha256"]].rename(columns={"prompt": "stored_prompt"}), on="key"
    )
    if only is not None:
        images = images[images.key.isin(set(only))].reset_index(drop=True)
    counts, notices = {}, []
    scored = {kind: set(store.scores(kind, model, set(images.key)).key) if len(images) else set()
              for kind, model in scorers.names().items()}  # fmt: skip
    needed = images[[any(k not in have for have in scored.values()) for k in images.key]]
    damaged = [
        k for k, digest in zip(needed.key, needed.image_sha256) if digest and file_digest(store.image(k)) != digest
    ]
    for key in damaged:  # the bytes changed since they were written: moved aside, made again by the next sweep
        store.set_aside_image(key, "its bytes differ from those written")
        notices.append(f"image {key} was damaged and is set aside; run the study again to make it")
    images = images[~images.key.isin(damaged)].reset_index(drop=True)
    for kind, model in scorers.names().items():
        todo = images[~images.key.isin(scored[kind])].reset_index(drop=True)
        counts[kind] = {"scored": len(todo), "already": len(images) - len(todo)}
        if todo.empty:
            continue
        scorers.get(kind)  # load before the first image: a bad model id fails here
        bar = tqdm(total=len(todo), desc=f"scoring ({kind})", unit="img", disable=bars_off(progress))
        for start in range(0, len(todo), chunk):
            part = todo.iloc[start : start + chunk]
            pictures = [_as_rgb(store.image(k)) for k in part.key]
            subjects = [t.split(",") if t else [] for t in part.tokens]
            frame, said = score_images(pictures, list(part.stored_prompt), subjects, scorers, [kind], batch_size)
            notices += [n for n in said if n not in notices]
            frame = frame.drop(columns=[f"{kind}_model"]).assign(key=list(part.key), model=model)
            store.write_scores(kind, frame)
            bar.update(len(part))
        bar.close()
    with file_lock(out / f".{VIEW}.lock"):
        view = json.loads((out / VIEW).read_text())
        view["scorers"] = {**view.get("scorers", {}), **scorers.names()}
        write_json(view, out / VIEW)
    return {"counts": counts, "notices": notices}


def scored_summary(result: dict) -> str:
    parts = [f"{kind}: {c['scored']} scored, {c['already']} already" for kind, c in result["counts"].items()]
    return "; ".join(parts) or "nothing to score"
