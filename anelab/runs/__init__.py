"""The runs layer: study files → work plan → runner → run store → results tables (DESIGN.md, second round).

- :mod:`.study` — study files, validated, at a scale (smoke / quick / full);
- :mod:`.plan` — blocks of seeds, shards, accelerate processes;
- :mod:`.store` — the content-addressed run store (images, traces, statistics, scores);
- :mod:`.runner` — runs a study's missing blocks into the store and writes its view;
- :mod:`.results` — one table per study (results, trace, statistics) from the view and the store;
- :mod:`.scoring` — scores a study's images into the store;
- :mod:`.calibration` — the plain-SD pass behind calibrated thresholds;
- :mod:`.protocol` — what each report notebook runs, the plan of a whole report and its shards.
"""

from __future__ import annotations

from pathlib import Path

from ..detection import DEFAULT_DETECTOR
from ..loading import load_pipeline
from ..log import logger, note
from ..metrics import DEFAULT_BLIP, DEFAULT_CLIP, Scorers
from ..stand_ins import TINY_MODELS
from .calibration import calibrated
from .results import load_results, load_stats, load_trace, load_view
from .runner import describe, run_sweep
from .scoring import score_run
from .store import Store
from .study import SCALES, Study, load_study

__all__ = [
    "SCALES",
    "Store",
    "Study",
    "load_results",
    "load_stats",
    "load_study",
    "load_trace",
    "load_view",
    "run_study",
    "run_sweep",
    "score_run",
]


def run_study(
    study: Study | str,
    model: str = "tiny",
    out: str | Path = "runs/study",
    *,
    scale: str = "full",
    pipe=None,
    device=None,
    dtype=None,
    store=None,
    clip: str | None = None,
    blip: str | None = None,
    detector: str | None = None,
    progress: bool = True,
    **overrides,
):
    """For notebooks: run a study (name, file or :class:`Study`) into the store, score it and return :func:`load_results`.

    ``scale`` shrinks a study given by name or file (:data:`SCALES`); the study is fitted to the model
    (:func:`anelab.runs.study.fit_study`); the scorers default to ``"tiny"`` for the tiny models and to the
    protocol's CLIP, BLIP and OWLv2 otherwise. Images and scores already in the
    store are reused, whichever study made them.
    """

    if not isinstance(study, Study):
        study = load_study(study, scale=scale, **overrides)
    pipe = pipe or load_pipeline(model, device=device, dtype=dtype)
    store = store if isinstance(store, Store) else Store(store)
    study = calibrated(study, pipe, store=store, model=str(model), progress=progress)
    summary = run_sweep(study, pipe, out, model=str(model), store=store, progress=progress)
    tiny = str(model) in TINY_MODELS
    scorers = Scorers(
        clip or ("tiny" if tiny else DEFAULT_CLIP),
        blip or ("tiny" if tiny else DEFAULT_BLIP),
        detector or ("tiny" if tiny else DEFAULT_DETECTOR),
        device=device,
    )
    scored = score_run(out, scorers, progress=progress)
    for notice in scored["notices"]:
        note(notice)
    logger.info(describe(summary, study, Path(out)))
    return load_results(out)
