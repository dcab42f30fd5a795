"""The block question on SD 3 and FLUX (notebook 06): which joint-attention blocks localise a subject, and what A&E
does there. Every block is recorded (:mod:`anelab.mmdit`, statistics only) under plain sampling and under A&E, per
prompt and seed; :func:`anelab.analysis.block_localisation` and :func:`anelab.analysis.transformer_guidance` read
the frame."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from tqdm import tqdm

from . import mmdit
from .config import GuidanceConfig
from .errors import AnelabError
from .log import bars_off
from .models import family
from .pipeline import generate
from .recording import Record


def block_runs(
    pipe,
    prompts: pd.DataFrame,
    seeds: Sequence[int],
    steps: int | None = None,
    config: GuidanceConfig | None = None,
    progress: bool = True,
    **options,
) -> pd.DataFrame:
    """Recorded token statistics of every block (and their ``mean``) for each prompt (rows of
    :func:`anelab.prompts.load_prompts`: ``prompt``, ``tokens``) under plain sampling (``variant="sd"``) and A&E
    (``"ae"``, ``config``; default A&E's thresholds placed by noise level, ``thresholds="sigma"``), with ``model``
    (the family), ``variant`` and ``block`` (the index in execution order) columns. ``steps``: the family's default."""
    if not mmdit.is_mmdit(pipe):
        raise AnelabError("block_runs reads a transformer's blocks (SD 3, FLUX); a UNet has resolutions instead")
    config = config or GuidanceConfig()
    options = {"thresholds": "sigma"} | options
    order = {b.name: k for k, b in enumerate(mmdit.blocks(pipe, 256, 256))}
    frames = []
    work = [(row, variant) for row in prompts.itertuples() for variant in ("sd", "ae")]
    for row, variant in tqdm(work, desc=f"{family(pipe)} blocks", disable=bars_off(progress), leave=False):
        method = dict(config=config, **options) if variant == "ae" else {}
        out = generate(
            pipe,
            row.prompt,
            list(row.tokens),
            seeds=list(seeds),
            num_inference_steps=steps,
            output_type="latent",
            record=Record(maps=False),
            progress=False,
            **method,
        )
        frame = out.attention.to_frame()
        frames.append(frame.assign(variant=variant, model=family(pipe), block=frame["layer"].map(order)))
    return pd.concat(frames, ignore_index=True)
