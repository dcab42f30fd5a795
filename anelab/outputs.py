"""What ``anelab generate`` leaves in ``--out``: the A&E layout, every run kept.

::

    OUT/<prompt folder>/<seed>.png   images (folder names from anelab.names: the prompt, or a safe slug + hash)
    OUT/prompts.json                 {folder: prompt}
    OUT/trace.parquet                the trace rows of every run, with run id, prompt, seeds and config

A second run into the same folder adds to ``trace.parquet`` (under a lock) instead of replacing it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pandas as pd

from . import methods
from .errors import AnelabError
from .io import file_lock, save_images, write_parquet
from .names import prompt_folder, remember_prompts

RUN_COLUMNS = ["run", "prompt", "seeds", "config", "model"]  # added in front of the trace columns


def save_generation(
    out: str | Path, *, prompt: str, seeds: list[int], images, trace: pd.DataFrame, config, model: str
) -> tuple[list[Path], str]:
    """Write one run's images and append its trace to ``out``; returns the image paths and the run id."""
    out = Path(out)
    run = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    folder = out / prompt_folder(prompt)
    remember_prompts(out, [prompt])
    paths = save_images(images, [folder / f"{s}.png" for s in seeds])
    labels = {
        "run": run,
        "prompt": prompt,
        "seeds": ",".join(map(str, seeds)),
        "config": json.dumps(methods.spec(config), sort_keys=True),
        "model": str(model),
    }
    trace = trace.assign(**labels)[RUN_COLUMNS + [c for c in trace.columns if c not in RUN_COLUMNS]]
    if trace.empty:  # plain SD has no trace rows: keep one row saying the run happened
        trace = pd.DataFrame([labels]).reindex(columns=trace.columns)
    target = out / "trace.parquet"
    with file_lock(out / ".trace.parquet.lock"):
        try:
            earlier = pd.read_parquet(target) if target.is_file() else None
        except Exception as error:  # pyarrow's errors for a damaged file
            raise AnelabError(
                f"{target} is damaged ({type(error).__name__}); move it away to keep this run's trace"
            ) from None
        write_parquet(trace if earlier is None else pd.concat([earlier, trace], ignore_index=True), target)
    return paths, run
